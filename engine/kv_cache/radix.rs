//! Radix tree from token sequences to KV slots, with reference counts (a locked path is in use by a
//! running request and cannot be evicted) and LRU eviction of unlocked leaves.
//!
//! ```text
//!   root ─[1 2 3]─ A ─[4 5]─ B          each edge holds its tokens and their slots;
//!                  └─[9]──── C          matching [1 2 3 9 7] returns the slots of 1 2 3 9.
//! ```
//! A partial match splits the edge so that every match ends on a node.
use std::collections::HashMap;

pub type NodeId = usize;
const ROOT: NodeId = 0;

#[derive(Debug)]
struct Node {
    parent: NodeId,
    children: HashMap<u32, NodeId>,
    key: Vec<u32>,
    slots: Vec<u32>,
    lock_ref: usize,
    last_access: u64,
}

#[derive(Debug, Clone)]
pub struct PrefixMatch {
    pub slots: Vec<u32>,
    /// Deepest node of the match (ROOT when nothing matched): lock it while the slots are in use.
    pub node: NodeId,
}

#[derive(Debug)]
pub struct RadixCache {
    nodes: Vec<Option<Node>>,
    free_ids: Vec<NodeId>,
    clock: u64,
    evictable: usize,
    protected: usize,
}

impl Default for RadixCache {
    fn default() -> Self {
        Self::new()
    }
}

impl RadixCache {
    pub fn new() -> Self {
        let root = Node { parent: ROOT, children: HashMap::new(), key: vec![], slots: vec![], lock_ref: 1, last_access: 0 };
        RadixCache { nodes: vec![Some(root)], free_ids: vec![], clock: 0, evictable: 0, protected: 0 }
    }

    fn node(&self, id: NodeId) -> &Node {
        self.nodes[id].as_ref().expect("live radix node")
    }
    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes[id].as_mut().expect("live radix node")
    }
    fn new_node(&mut self, n: Node) -> NodeId {
        match self.free_ids.pop() {
            Some(id) => {
                self.nodes[id] = Some(n);
                id
            }
            None => {
                self.nodes.push(Some(n));
                self.nodes.len() - 1
            }
        }
    }

    /// Tokens cached in the tree.
    pub fn total_size(&self) -> usize {
        self.evictable + self.protected
    }
    pub fn evictable_size(&self) -> usize {
        self.evictable
    }
    pub fn protected_size(&self) -> usize {
        self.protected
    }

    /// Splits `child` after `at` tokens; returns the new upper node.
    fn split(&mut self, child: NodeId, at: usize) -> NodeId {
        let (parent, key, slots, lock_ref, last_access) = {
            let c = self.node(child);
            (c.parent, c.key.clone(), c.slots.clone(), c.lock_ref, c.last_access)
        };
        let mid = self.new_node(Node {
            parent,
            children: HashMap::from([(key[at], child)]),
            key: key[..at].to_vec(),
            slots: slots[..at].to_vec(),
            lock_ref,
            last_access,
        });
        {
            let c = self.node_mut(child);
            c.key = key[at..].to_vec();
            c.slots = slots[at..].to_vec();
            c.parent = mid;
        }
        self.node_mut(parent).children.insert(key[0], mid);
        mid
    }

    fn common(a: &[u32], b: &[u32]) -> usize {
        a.iter().zip(b).take_while(|(x, y)| x == y).count()
    }

    /// Longest cached prefix of `key`.
    pub fn match_prefix(&mut self, key: &[u32]) -> PrefixMatch {
        self.clock += 1;
        let now = self.clock;
        let mut node = ROOT;
        let mut slots = Vec::new();
        let mut rest = key;
        while let Some(&child) = rest.first().and_then(|t| self.node(node).children.get(t)) {
            let child_len = self.node(child).key.len();
            let l = Self::common(&self.node(child).key, rest);
            let matched = if l < child_len { self.split(child, l) } else { child };
            self.node_mut(matched).last_access = now;
            slots.extend_from_slice(&self.node(matched).slots);
            node = matched;
            rest = &rest[l..];
            if l < child_len {
                break;
            }
        }
        PrefixMatch { slots, node }
    }

    /// Inserts `key` → `slots`; returns how many leading tokens were already cached (their slots in
    /// the tree are kept; the caller still owns `slots[..returned]`).
    pub fn insert(&mut self, key: &[u32], slots: &[u32]) -> usize {
        assert_eq!(key.len(), slots.len(), "radix insert: key and slots differ in length");
        self.clock += 1;
        let now = self.clock;
        let mut node = ROOT;
        let mut done = 0;
        while done < key.len() {
            let rest = &key[done..];
            match self.node(node).children.get(&rest[0]).copied() {
                Some(child) => {
                    let l = Self::common(&self.node(child).key, rest);
                    let next = if l < self.node(child).key.len() { self.split(child, l) } else { child };
                    self.node_mut(next).last_access = now;
                    done += l;
                    node = next;
                }
                None => {
                    let leaf = self.new_node(Node {
                        parent: node,
                        children: HashMap::new(),
                        key: rest.to_vec(),
                        slots: slots[done..].to_vec(),
                        lock_ref: 0,
                        last_access: now,
                    });
                    self.node_mut(node).children.insert(rest[0], leaf);
                    self.evictable += rest.len();
                    return done;
                }
            }
        }
        done
    }

    /// Marks the path from `node` to the root as in use.
    pub fn lock(&mut self, mut node: NodeId) {
        while node != ROOT {
            let n = self.node_mut(node);
            n.lock_ref += 1;
            let (len, first, parent) = (n.key.len(), n.lock_ref == 1, n.parent);
            if first {
                self.evictable -= len;
                self.protected += len;
            }
            node = parent;
        }
    }

    pub fn unlock(&mut self, mut node: NodeId) {
        while node != ROOT {
            let n = self.node_mut(node);
            assert!(n.lock_ref > 0, "radix unlock of an unlocked node");
            n.lock_ref -= 1;
            let (len, last, parent) = (n.key.len(), n.lock_ref == 0, n.parent);
            if last {
                self.protected -= len;
                self.evictable += len;
            }
            node = parent;
        }
    }

    /// Evicts least-recently-used unlocked leaves until at least `n` slots are freed (or nothing
    /// evictable is left); returns the freed slots.
    pub fn evict(&mut self, n: usize) -> Vec<u32> {
        let mut freed = Vec::new();
        let mut leaves: Vec<(u64, NodeId)> = (1..self.nodes.len())
            .filter(|&i| self.nodes[i].as_ref().is_some_and(|x| x.children.is_empty() && x.lock_ref == 0))
            .map(|i| (self.node(i).last_access, i))
            .collect();
        leaves.sort_unstable_by(|a, b| b.cmp(a)); // pop() takes the oldest
        while freed.len() < n {
            let Some((_, id)) = leaves.pop() else { break };
            let node = self.nodes[id].take().expect("live leaf");
            self.free_ids.push(id);
            self.evictable -= node.key.len();
            freed.extend_from_slice(&node.slots);
            let p = node.parent;
            self.node_mut(p).children.remove(&node.key[0]);
            if p != ROOT && self.node(p).children.is_empty() && self.node(p).lock_ref == 0 {
                let t = self.node(p).last_access;
                let pos = leaves.partition_point(|x| *x > (t, p));
                leaves.insert(pos, (t, p));
            }
        }
        freed
    }

    /// Drops everything unlocked; returns the freed slots.
    pub fn reset(&mut self) -> Vec<u32> {
        self.evict(usize::MAX)
    }

    /// Recounts the tree: node slot counts equal key lengths, sizes add up, slots are unique.
    pub fn check_integrity(&self) -> Result<Vec<u32>, String> {
        let (mut ev, mut pr) = (0, 0);
        let mut all = Vec::new();
        for (i, n) in self.nodes.iter().enumerate().skip(1) {
            let Some(n) = n else { continue };
            if n.key.len() != n.slots.len() || n.key.is_empty() {
                return Err(format!("radix node {i}: {} tokens, {} slots", n.key.len(), n.slots.len()));
            }
            if n.lock_ref == 0 { ev += n.key.len() } else { pr += n.key.len() }
            all.extend_from_slice(&n.slots);
        }
        if (ev, pr) != (self.evictable, self.protected) {
            return Err(format!("radix sizes: counted evictable {ev} protected {pr}, recorded {} {}", self.evictable, self.protected));
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_insert_split_lock_evict() {
        let mut r = RadixCache::new();
        assert_eq!(r.insert(&[1, 2, 3, 4], &[10, 20, 30, 40]), 0);
        let m = r.match_prefix(&[1, 2, 9]);
        assert_eq!(m.slots, vec![10, 20]);
        // the edge was split at 2 tokens: a second insert shares the prefix
        assert_eq!(r.insert(&[1, 2, 7], &[11, 21, 71]), 2);
        assert_eq!(r.total_size(), 5);
        assert_eq!(r.match_prefix(&[1, 2, 7, 8]).slots, vec![10, 20, 71]);
        assert_eq!(r.match_prefix(&[5]).slots, Vec::<u32>::new());
        let m = r.match_prefix(&[1, 2, 3, 4]);
        assert_eq!(m.slots, vec![10, 20, 30, 40]);
        r.lock(m.node);
        assert_eq!(r.protected_size(), 4);
        assert_eq!(r.evictable_size(), 1);
        // only the unlocked leaf [7] can go
        assert_eq!(r.evict(100), vec![71]);
        assert_eq!(r.total_size(), 4);
        r.unlock(m.node);
        let mut freed = r.evict(1);
        freed.sort();
        assert_eq!(freed, vec![30, 40]);
        assert_eq!(r.total_size(), 2);
        r.check_integrity().unwrap();
        let mut rest = r.reset();
        rest.sort();
        assert_eq!(rest, vec![10, 20]);
        assert_eq!(r.total_size(), 0);
    }

    #[test]
    fn lru_order() {
        let mut r = RadixCache::new();
        r.insert(&[1], &[1]);
        r.insert(&[2], &[2]);
        r.insert(&[3], &[3]);
        r.match_prefix(&[1]); // 1 is now the most recent
        assert_eq!(r.evict(1), vec![2]);
        assert_eq!(r.evict(1), vec![3]);
        assert_eq!(r.evict(1), vec![1]);
    }

    #[test]
    fn random_operations_keep_integrity() {
        let mut rng = crate::sampling::Rng::new(3);
        let mut r = RadixCache::new();
        let mut next_slot = 0u32;
        let mut locked = vec![];
        for _ in 0..500 {
            let len = 1 + (rng.next_u64() % 8) as usize;
            let key: Vec<u32> = (0..len).map(|_| (rng.next_u64() % 3) as u32).collect();
            match rng.next_u64() % 4 {
                0 | 1 => {
                    let slots: Vec<u32> = (0..len as u32).map(|i| next_slot + i).collect();
                    next_slot += len as u32;
                    r.insert(&key, &slots);
                }
                2 => {
                    let m = r.match_prefix(&key);
                    r.lock(m.node);
                    locked.push(m.node);
                }
                _ => {
                    if let Some(n) = locked.pop() {
                        r.unlock(n);
                    }
                    r.evict(2);
                }
            }
            let all = r.check_integrity().unwrap();
            let mut u = all.clone();
            u.sort();
            u.dedup();
            assert_eq!(u.len(), all.len(), "a slot is cached twice");
        }
    }
}
