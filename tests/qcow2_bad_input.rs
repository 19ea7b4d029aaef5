//! (being written)

mod harness;
