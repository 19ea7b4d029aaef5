//! `livesnap create`: a local raw or qcow2 image, written by livesnap's own
//! image writer (the layout `qemu-img create` makes), no endpoint needed.

use std::path::Path;

use livesnap_block::{create_image, CreateOptions, ImageFormat};

use crate::error::{Failure, Result};
use crate::units::bytes;

/// Runs `livesnap create`.
pub async fn run(
    path: &Path,
    format: ImageFormat,
    size: Option<u64>,
    backing: Option<(String, String)>,
    cluster_size: Option<u64>,
) -> Result<()> {
    if format == ImageFormat::Raw && backing.is_some() {
        return Err(Failure::usage("a raw image has no backing file"));
    }
    if size.is_none() && backing.is_none() {
        return Err(Failure::usage(
            "--size is needed (or --backing to take its size)",
        ));
    }
    let opts = CreateOptions {
        filename: path.to_string_lossy().into_owned(),
        format,
        size,
        cluster_size,
        backing_file: backing.as_ref().map(|b| b.0.clone()),
        backing_format: backing.as_ref().map(|b| b.1.clone()),
    };
    create_image(&opts)
        .await
        .map_err(|e| Failure::endpoint(format!("create {}: {e}", path.display())))?;
    let size_text = size
        .map(bytes)
        .unwrap_or_else(|| "the backing file's size".into());
    match &backing {
        Some((b, f)) => println!(
            "created {} ({}, {size_text}, backing {b} ({f}))",
            path.display(),
            format.name()
        ),
        None => println!(
            "created {} ({}, {size_text})",
            path.display(),
            format.name()
        ),
    }
    Ok(())
}
