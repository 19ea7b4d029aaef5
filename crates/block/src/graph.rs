//! The block graph: every node by name, in creation order (QEMU's
//! `graph_bdrv_states`), with QEMU's rules for naming and deleting nodes.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::node::{BlockNode, NodeUser};

/// Longest node name plus one: the size of QEMU's `BlockDriverState.node_name`.
const NODE_NAME_SIZE: usize = 32;

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
pub fn check_node_name(name: &str) -> Result<()> {
    if name.len() < NODE_NAME_SIZE && id_wellformed(name) {
        Ok(())
    } else {
        Err(Error::invalid(format!("Invalid node-name: '{name}'")))
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

    /// The name a new node takes, checked in the order of QEMU's
    /// `bdrv_open_common`: well formed, free, under 32 bytes; without one,
    /// an automatic name.
    pub fn claim_name(&self, name: Option<&str>) -> Result<String> {
        let Some(name) = name else {
            return Ok(self.auto_name());
        };
        if !id_wellformed(name) {
            return Err(Error::invalid(format!("Invalid node-name: '{name}'")));
        }
        self.check_free(name)?;
        if name.len() >= NODE_NAME_SIZE {
            return Err(Error::invalid("Node name too long"));
        }
        Ok(name.to_string())
    }

    /// Refuses a name that is already taken.
    pub fn check_free(&self, name: &str) -> Result<()> {
        if self.get(name).is_some() {
            return Err(Error::invalid(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        Ok(())
    }

    /// Adds an opened node, as the newest.
    pub fn insert(&self, node: Arc<BlockNode>) -> Result<()> {
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
    pub fn insert_at(&self, node: Arc<BlockNode>, at: usize) -> Result<()> {
        let mut nodes = self.nodes.lock().unwrap();
        if nodes.iter().any(|n| n.name() == node.name()) {
            return Err(Error::invalid(format!(
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
    pub fn find(&self, name: &str) -> Result<Arc<BlockNode>> {
        self.get(name).ok_or_else(|| {
            Error::not_found(format!("Cannot find device='' nor node-name='{name}'"))
        })
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
    pub fn remove(&self, name: &str) -> Result<()> {
        let mut nodes = self.nodes.lock().unwrap();
        let Some(pos) = nodes.iter().position(|n| n.name() == name) else {
            return Err(Error::not_found(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        let node = nodes[pos].clone();
        let users = node.users();
        if users.iter().any(|u| !matches!(u, NodeUser::Blocker(_))) {
            return Err(Error::busy(format!("Node {name} is in use")));
        }
        if let Some(reason) = users.first().and_then(NodeUser::blocker_reason) {
            return Err(Error::busy(format!("Node '{name}' is busy: {reason}")));
        }
        // QEMU's op blocker on backing images (the newest parent's).
        let backing_parent = nodes.iter().rev().find(|n| {
            n.children()
                .iter()
                .any(|c| c.role == "backing" && Arc::ptr_eq(&c.node, &node))
        });
        if let Some(parent) = backing_parent {
            return Err(Error::busy(format!(
                "Node '{name}' is busy: node is used as backing hd of '{}'",
                parent.name()
            )));
        }
        if !node.monitor_owned() {
            return Err(Error::invalid(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if Self::has_parent(&nodes, &node) {
            return Err(Error::busy(format!("Block device {name} is in use")));
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
