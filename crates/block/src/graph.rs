//! The block graph: every node by name, in creation order (QEMU's
//! `graph_bdrv_states`), with QEMU's rules for naming and deleting nodes.

use std::sync::{Arc, Mutex};

use crate::node::BlockNode;

/// A graph operation refused; the message is QEMU's text for the same case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GraphError(pub String);

/// Users whose name starts with this are QEMU op blockers (a job's source)
/// rather than attached backends: `blockdev-del` reports them as "busy".
pub const BLOCKER_PREFIX: &str = "blocker: ";

/// All nodes of one daemon.
#[derive(Default)]
pub struct BlockGraph {
    nodes: Mutex<Vec<Arc<BlockNode>>>,
    next_auto: Mutex<u64>,
}

/// QEMU's `id_wellformed()`, for node names, export and job ids: a letter,
/// then letters, digits, '-', '.' and '_'.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Checks a user-given node name as QEMU does: well formed, under 32 bytes.
pub fn check_node_name(name: &str) -> Result<(), GraphError> {
    if name.len() < 32 && id_wellformed(name) {
        Ok(())
    } else {
        Err(GraphError(format!("Invalid node-name: '{name}'")))
    }
}

impl BlockGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh name for a node the user did not name (QEMU: `#blockNNN`).
    pub fn auto_name(&self) -> String {
        let mut n = self.next_auto.lock().unwrap();
        *n += 1;
        format!("#block{:03}", *n)
    }

    /// Refuses a name that is already taken.
    pub fn check_free(&self, name: &str) -> Result<(), GraphError> {
        if self.get(name).is_some() {
            return Err(GraphError(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        Ok(())
    }

    /// Adds an opened node, as the newest.
    pub fn insert(&self, node: Arc<BlockNode>) -> Result<(), GraphError> {
        self.insert_at(node, usize::MAX)
    }

    /// Number of nodes: the position a node named now takes in creation
    /// order, for [`BlockGraph::insert_at`].
    pub fn position(&self) -> usize {
        self.nodes.lock().unwrap().len()
    }

    /// Adds an opened node at position `at` of the creation order (clamped
    /// to the end). A qcow2 node is named in QEMU before its backing chain
    /// is opened, so it comes before the backing nodes in the order even
    /// though it is inserted after them.
    pub fn insert_at(&self, node: Arc<BlockNode>, at: usize) -> Result<(), GraphError> {
        let mut nodes = self.nodes.lock().unwrap();
        if nodes.iter().any(|n| n.name() == node.name()) {
            return Err(GraphError(format!(
                "Duplicate nodes with node-name='{}'",
                node.name()
            )));
        }
        let at = at.min(nodes.len());
        nodes.insert(at, node);
        Ok(())
    }

    /// The node called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<BlockNode>> {
        self.nodes
            .lock()
            .unwrap()
            .iter()
            .find(|n| n.name() == name)
            .cloned()
    }

    /// The node called `name`, or QEMU's error for a missing node.
    pub fn find(&self, name: &str) -> Result<Arc<BlockNode>, GraphError> {
        self.get(name)
            .ok_or_else(|| GraphError(format!("Cannot find device='' nor node-name='{name}'")))
    }

    /// All nodes, oldest first.
    pub fn nodes(&self) -> Vec<Arc<BlockNode>> {
        self.nodes.lock().unwrap().clone()
    }

    /// Drops a node unconditionally: undoes a half-finished `blockdev-add`.
    pub fn discard(&self, name: &str) {
        self.nodes.lock().unwrap().retain(|n| n.name() != name);
    }

    /// The nodes that have `child` as a child, with the child's role
    /// (`file`, `backing`), oldest first.
    pub fn parents(&self, child: &BlockNode) -> Vec<(Arc<BlockNode>, &'static str)> {
        let nodes = self.nodes.lock().unwrap();
        let mut out = Vec::new();
        for n in nodes.iter() {
            for c in n.children() {
                if std::ptr::eq(Arc::as_ptr(&c.node), child) {
                    out.push((n.clone(), c.role));
                }
            }
        }
        out
    }

    fn has_parent(nodes: &[Arc<BlockNode>], child: &BlockNode) -> bool {
        nodes.iter().any(|n| {
            n.children()
                .iter()
                .any(|c| std::ptr::eq(Arc::as_ptr(&c.node), child))
        })
    }

    /// Deletes a monitor-owned node with no users and no parents (QMP `blockdev-del`),
    /// and with it the unnamed children that only it held.
    pub fn remove(&self, name: &str) -> Result<(), GraphError> {
        let mut nodes = self.nodes.lock().unwrap();
        let Some(pos) = nodes.iter().position(|n| n.name() == name) else {
            return Err(GraphError(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        let node = nodes[pos].clone();
        let users = node.users();
        if users.iter().any(|u| !u.starts_with(BLOCKER_PREFIX)) {
            return Err(GraphError(format!("Node {name} is in use")));
        }
        if let Some(reason) = users.first() {
            return Err(GraphError(format!(
                "Node '{name}' is busy: {}",
                &reason[BLOCKER_PREFIX.len()..]
            )));
        }
        // QEMU's op blocker on backing images (the newest parent's).
        let backing_parent = nodes.iter().rev().find(|n| {
            n.children()
                .iter()
                .any(|c| c.role == "backing" && Arc::ptr_eq(&c.node, &node))
        });
        if let Some(parent) = backing_parent {
            return Err(GraphError(format!(
                "Node '{name}' is busy: node is used as backing hd of '{}'",
                parent.name()
            )));
        }
        if !node.monitor_owned() {
            return Err(GraphError(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if Self::has_parent(&nodes, &node) {
            return Err(GraphError(format!("Block device {name} is in use")));
        }
        nodes.remove(pos);
        // Implicit children go with their parent, recursively.
        let mut orphans: Vec<Arc<BlockNode>> =
            node.children().into_iter().map(|c| c.node).collect();
        while let Some(child) = orphans.pop() {
            if child.monitor_owned() || Self::has_parent(&nodes, &child) {
                continue;
            }
            if let Some(i) = nodes.iter().position(|n| Arc::ptr_eq(n, &child)) {
                nodes.remove(i);
                orphans.extend(child.children().into_iter().map(|c| c.node));
            }
        }
        Ok(())
    }
}
