fn main() {
    // Like other command-line tools, end quietly when the reader of stdout goes away (`| head`).
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(engine::cli::main());
}
