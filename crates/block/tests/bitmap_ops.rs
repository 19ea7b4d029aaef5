//! Named dirty bitmaps at node level, as the QMP commands and NBD exports
//! use them: writes recorded by granularity, merges across nodes and
//! granularities with QEMU's checks in QEMU's order, the extents NBD
//! reports, and where an export finds a bitmap given by name only.

use std::sync::Arc;

use livesnap_block::blkdebug::new_node;
use livesnap_block::{
    lookup_bitmap, BitmapRef, BlkdebugOptions, BlockGraph, BlockNode, IoBuf, RawDriver, RawOptions,
    Use, WriteFlags,
};
use livesnap_testkit::block::file_node;
use livesnap_testkit::sparse_file;

const MIB: u64 = 1 << 20;
const K64: u64 = 64 * 1024;

/// A graph with `raw` nodes `a` and `b` (1 MiB) and `big` (2 MiB), each
/// over its own file.
fn graph(dir: &tempfile::TempDir) -> BlockGraph {
    let g = BlockGraph::new();
    for (name, size) in [("a", MIB), ("b", MIB), ("big", 2 * MIB)] {
        let file = file_node(&sparse_file(dir.path().join(name), size), false);
        let raw = RawDriver::open(file, RawOptions::default()).unwrap();
        g.insert(BlockNode::new(name, Box::new(raw), false, false))
            .unwrap();
    }
    g
}

fn err<T>(r: livesnap_block::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

async fn write(node: &BlockNode, offset: u64, len: usize) {
    node.write(
        offset,
        IoBuf::from_slice(&vec![7; len]),
        WriteFlags::default(),
    )
    .await
    .unwrap();
}

fn count(node: &BlockNode, name: &str) -> u64 {
    node.bitmaps()
        .infos()
        .into_iter()
        .find(|i| i.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no bitmap {name}"))
        .count
}

fn local(name: &str) -> BitmapRef {
    BitmapRef::Local(name.into())
}

fn ext(node: &str, name: &str) -> BitmapRef {
    BitmapRef::External {
        node: node.into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn writes_count_by_granularity_and_clear_empties() {
    let dir = tempfile::tempdir().unwrap();
    let g = graph(&dir);
    let a = g.get("a").unwrap();
    a.add_bitmap("coarse", None, false, false).await.unwrap();
    a.add_bitmap("fine", Some(512), false, false).await.unwrap();
    a.add_bitmap("off", None, false, true).await.unwrap();
    write(&a, 70000, 100).await;
    assert_eq!(count(&a, "coarse"), K64, "one 64 KiB chunk");
    assert_eq!(count(&a, "fine"), 512, "one sector");
    assert_eq!(count(&a, "off"), 0, "a disabled bitmap records nothing");
    // Newest first, as QEMU lists them.
    let names: Vec<String> = a
        .bitmaps()
        .infos()
        .into_iter()
        .filter_map(|i| i.name)
        .collect();
    assert_eq!(names, ["off", "fine", "coarse"]);

    let old = a.clear_bitmap("coarse").unwrap();
    assert_eq!(old.dirty_bytes(), K64, "the bits it held come back");
    assert_eq!(count(&a, "coarse"), 0);
    a.set_bitmap_enabled("off", true).await.unwrap();
    write(&a, 0, 1).await;
    assert_eq!(count(&a, "off"), K64);
    a.set_bitmap_enabled("off", false).await.unwrap();
    write(&a, 5 * K64, 1).await;
    assert_eq!(count(&a, "off"), K64, "disabled again");

    // QEMU counts whole chunks, even past the end of the disk.
    a.add_bitmap("huge", Some(1 << 31), false, false)
        .await
        .unwrap();
    write(&a, MIB - 1, 1).await;
    assert_eq!(count(&a, "huge"), 1 << 31);
}

#[tokio::test]
async fn merge_across_nodes_and_granularities() {
    let dir = tempfile::tempdir().unwrap();
    let g = graph(&dir);
    let (a, b) = (g.get("a").unwrap(), g.get("b").unwrap());
    a.add_bitmap("t", None, false, true).await.unwrap();
    a.add_bitmap("x", Some(512), false, false).await.unwrap();
    b.add_bitmap("y", Some(4096), false, false).await.unwrap();
    write(&a, 70000, 100).await;
    write(&b, 3 * K64 + 10, 1).await;
    let old = a
        .merge_bitmaps(&g, "t", &[local("x"), ext("b", "y"), local("t")])
        .await
        .unwrap();
    assert!(old.is_clean());
    // Each source byte dirty makes its 64 KiB chunk dirty in the target.
    assert_eq!(count(&a, "t"), 2 * K64);
    let ext_runs = a.bitmap_extents("t", 0, MIB, 100).unwrap();
    assert_eq!(
        ext_runs,
        vec![
            (K64, false),
            (K64, true),
            (K64, false),
            (K64, true),
            (MIB - 4 * K64, false)
        ]
    );
    // Into itself: nothing changes.
    a.merge_bitmaps(&g, "t", &[local("t")]).await.unwrap();
    assert_eq!(count(&a, "t"), 2 * K64);
    // No sources: nothing changes either (qsd 10.0.2 crashes on this).
    a.merge_bitmaps(&g, "t", &[]).await.unwrap();
    assert_eq!(count(&a, "t"), 2 * K64);
}

#[tokio::test]
async fn merge_errors_in_qemu_order_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let g = graph(&dir);
    let (a, big) = (g.get("a").unwrap(), g.get("big").unwrap());
    a.add_bitmap("t", None, false, true).await.unwrap();
    a.add_bitmap("x", None, false, false).await.unwrap();
    big.add_bitmap("z", None, false, false).await.unwrap();
    write(&a, 0, 1).await;

    assert_eq!(
        err(lookup_bitmap(&g, "nosuch", "t")),
        "Node 'nosuch' not found"
    );
    assert_eq!(
        err(lookup_bitmap(&g, "a", "nosuch")),
        "Dirty bitmap 'nosuch' not found"
    );
    // Sources in order: the first bad one is reported.
    for (sources, text) in [
        (
            vec![local("nosuch"), ext("nosuch", "z")],
            "Dirty bitmap 'nosuch' not found",
        ),
        (
            vec![ext("nosuch", "z"), local("nosuch")],
            "Node 'nosuch' not found",
        ),
        (
            vec![ext("big", "nosuch"), local("nosuch")],
            "Dirty bitmap 'nosuch' not found",
        ),
        (
            vec![ext("big", "z"), local("nosuch")],
            "Bitmaps are of different sizes (destination size is 1048576, source size is \
             2097152) and can't be merged",
        ),
    ] {
        assert_eq!(err(a.merge_bitmaps(&g, "t", &sources).await), text);
    }
    // A busy source or target refuses; the target is checked first.
    a.bitmaps().hold("x", Use::Read).unwrap();
    assert_eq!(
        err(a.merge_bitmaps(&g, "t", &[local("x")]).await),
        "Bitmap 'x' is currently in use by another operation and cannot be used"
    );
    a.bitmaps().hold("t", Use::Read).unwrap();
    assert_eq!(
        err(a.merge_bitmaps(&g, "t", &[local("x")]).await),
        "Bitmap 't' is currently in use by another operation and cannot be used"
    );
    a.bitmaps().release("x");
    for what in ["clear", "enable", "remove"] {
        let r = match what {
            "clear" => a.clear_bitmap("t").map(|_| ()),
            "enable" => a.set_bitmap_enabled("t", true).await,
            _ => a.remove_bitmap("t").await,
        };
        assert_eq!(
            err(r),
            "Bitmap 't' is currently in use by another operation and cannot be used",
            "{what} of a busy bitmap"
        );
    }
    a.bitmaps().release("t");
    assert_eq!(count(&a, "t"), 0, "no failed merge changed the target");
    a.merge_bitmaps(&g, "t", &[local("x")]).await.unwrap();
    assert_eq!(count(&a, "t"), K64);
}

#[tokio::test]
async fn extents_cap_and_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let g = graph(&dir);
    let a = g.get("a").unwrap();
    a.add_bitmap("m", Some(4096), false, false).await.unwrap();
    for i in 0..10 {
        write(&a, i * 8192, 1).await;
    }
    let all = a.bitmap_extents("m", 0, MIB, usize::MAX).unwrap();
    assert_eq!(all.len(), 20);
    assert_eq!(all[0], (4096, true));
    assert_eq!(all[19], (MIB - 19 * 4096, false));
    assert_eq!(
        a.bitmap_extents("m", 100, MIB, 3).unwrap(),
        vec![(3996, true), (4096, false), (4096, true)]
    );
    // A range reaching past the bitmap (an export of a bigger node) reads clean there.
    assert_eq!(
        a.bitmap_extents("m", MIB - 4096, 3 * 4096, 10).unwrap(),
        vec![(3 * 4096, false)]
    );
    assert!(a.bitmap_extents("nosuch", 0, 1, 1).is_none());
}

#[tokio::test]
async fn found_below_through_filters_not_raw() {
    let dir = tempfile::tempdir().unwrap();
    let g = graph(&dir);
    let a = g.get("a").unwrap();
    a.add_bitmap("on-a", None, false, false).await.unwrap();
    // blkdebug is a filter: a name given to an export of it finds a's bitmap.
    let (dbg, _rules) = new_node("dbg", a.clone(), BlkdebugOptions::default()).unwrap();
    let found = dbg.find_bitmap_below("on-a").expect("through the filter");
    assert!(Arc::ptr_eq(&found, &a));
    assert!(dbg.find_bitmap_below("nosuch").is_none());
    // raw is not a filter: its file's bitmaps are not its own.
    let file = a.children().into_iter().find(|c| c.role == "file").unwrap();
    file.node
        .add_bitmap("on-file", None, false, false)
        .await
        .unwrap();
    assert!(a.find_bitmap_below("on-file").is_none());
    assert!(Arc::ptr_eq(
        &file.node.find_bitmap_below("on-file").unwrap(),
        &file.node
    ));
}
