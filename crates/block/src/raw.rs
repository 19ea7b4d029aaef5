//! The `raw` format driver: the child's bytes as they are, optionally a window
//! `[offset, offset + size)` of them (QEMU's `block/raw-format.c`).

use std::io;
use std::sync::Arc;

use crate::buf::IoBuf;
use crate::driver::{BlockDriver, BlockStatus, ChildRef, IoFuture, Limits, WriteFlags, ZeroFlags};
use crate::node::BlockNode;

/// Options of the `raw` driver, named as in QEMU's `BlockdevOptionsRaw`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawOptions {
    /// Start of the window in the child, in bytes.
    pub offset: Option<u64>,
    /// Length of the window; defaults to the rest of the child.
    pub size: Option<u64>,
}

/// A raw image over a `file` child.
pub struct RawDriver {
    file: Arc<BlockNode>,
    offset: u64,
    size: u64,
}

impl RawDriver {
    /// Opens a raw view of `file`; the error text is QEMU's.
    pub fn open(file: Arc<BlockNode>, opts: RawOptions) -> crate::Result<RawDriver> {
        let child_size = file.size();
        let offset = opts.offset.unwrap_or(0);
        if offset > child_size {
            return Err(crate::Error::invalid(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({child_size})"
            )));
        }
        let size = opts.size.unwrap_or(child_size - offset);
        if offset.checked_add(size).is_none_or(|end| end > child_size) {
            return Err(crate::Error::invalid(format!(
                "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({child_size})"
            )));
        }
        if opts.size.is_some() && !size.is_multiple_of(512) {
            return Err(crate::Error::invalid(
                "Specified size is not multiple of 512",
            ));
        }
        Ok(RawDriver { file, offset, size })
    }
}

impl RawDriver {
    /// The child and where the window starts in it.
    pub(crate) fn window(&self) -> (&Arc<BlockNode>, u64) {
        (&self.file, self.offset)
    }
}

impl BlockDriver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn limits(&self) -> Limits {
        // The node layer of the child pads for its own alignment; passing it up
        // lets clients see the real minimum block size.
        self.file.limits()
    }

    fn filename(&self) -> String {
        self.file.filename()
    }

    fn children(&self) -> Vec<ChildRef> {
        vec![ChildRef {
            role: "file",
            node: self.file.clone(),
        }]
    }

    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(self.file.read_into(self.offset + offset, buf))
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture<'_, ()> {
        Box::pin(self.file.write(self.offset + offset, buf, flags))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(self.file.write_zeroes(self.offset + offset, len, flags))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.file.discard(self.offset + offset, len))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.file.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            if len == 0 {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.file.block_status(self.offset + offset, len).await
        })
    }
}
