//! The libvirt calls the `virt` crate does not wrap (backup, checkpoints,
//! block copy and its job, the guest agent's freeze, typed parameters), as small safe
//! functions over `virt-sys`. Every `unsafe` block of the libvirt endpoint
//! but the event callbacks is here. All of these block the calling thread:
//! callers run them through [`super::Libvirt::call`].

use std::ffi::{c_char, c_int, c_uint, CStr, CString};
use std::ptr;

use virt::domain::Domain;
use virt::error::Error;
use virt_sys as sys;

/// A libvirt call's result.
pub type VirtResult<T> = std::result::Result<T, Error>;

fn cstring(s: &str) -> VirtResult<CString> {
    CString::new(s).map_err(|_| Error::last_error())
}

fn check(ret: c_int) -> VirtResult<c_int> {
    if ret < 0 {
        Err(Error::last_error())
    } else {
        Ok(ret)
    }
}

/// `virDomainBackupBegin`, with a checkpoint created at the backup's
/// instant when `checkpoint_xml` is given.
pub fn backup_begin(
    dom: &Domain,
    xml: &str,
    checkpoint_xml: Option<&str>,
    flags: u32,
) -> VirtResult<()> {
    let xml = cstring(xml)?;
    let cp = checkpoint_xml.map(cstring).transpose()?;
    let cp_ptr = cp.as_ref().map_or(ptr::null(), |c| c.as_ptr());
    // SAFETY: the domain pointer is valid while `dom` lives; the XML
    // documents are NUL-terminated strings (or null) that outlive the call.
    check(unsafe { sys::virDomainBackupBegin(dom.as_ptr(), xml.as_ptr(), cp_ptr, flags) })?;
    Ok(())
}

/// `virDomainCheckpointLookupByName`: `Ok(None)` when the domain has no
/// checkpoint `name`. The handle is freed before returning unless `then`
/// is given, which runs on it first.
fn with_checkpoint<T>(
    dom: &Domain,
    name: &str,
    then: impl FnOnce(sys::virDomainCheckpointPtr) -> VirtResult<T>,
) -> VirtResult<Option<T>> {
    let name = cstring(name)?;
    // SAFETY: valid domain pointer and string.
    let cp = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), name.as_ptr(), 0) };
    if cp.is_null() {
        let e = Error::last_error();
        let none = virt::error::ErrorNumberEnum::from(virt::error::ErrorNumber::NoDomainCheckpoint);
        return if e.code() == none { Ok(None) } else { Err(e) };
    }
    let r = then(cp);
    // SAFETY: a checkpoint handle returned by the lookup above.
    unsafe { sys::virDomainCheckpointFree(cp) };
    r.map(Some)
}

/// The domain has checkpoint `name`.
pub fn checkpoint_exists(dom: &Domain, name: &str) -> VirtResult<bool> {
    Ok(with_checkpoint(dom, name, |_| Ok(()))?.is_some())
}

/// `virDomainCheckpointDelete` of checkpoint `name` (libvirt removes its
/// bitmaps); `Ok(false)` when there is no such checkpoint.
pub fn checkpoint_delete(dom: &Domain, name: &str) -> VirtResult<bool> {
    Ok(with_checkpoint(dom, name, |cp| {
        // SAFETY: a valid checkpoint handle.
        check(unsafe { sys::virDomainCheckpointDelete(cp, 0) }).map(|_| ())
    })?
    .is_some())
}

/// `virDomainAbortJob`.
pub fn abort_job(dom: &Domain) -> VirtResult<()> {
    // SAFETY: a valid domain pointer.
    check(unsafe { sys::virDomainAbortJob(dom.as_ptr()) })?;
    Ok(())
}

/// `virDomainBlockCopy` of `disk` to the disk described by `dest_xml`, with
/// a bandwidth in bytes per second (0: unlimited).
pub fn block_copy(
    dom: &Domain,
    disk: &str,
    dest_xml: &str,
    bandwidth: u64,
    flags: u32,
) -> VirtResult<()> {
    let disk = cstring(disk)?;
    let xml = cstring(dest_xml)?;
    let mut params: sys::virTypedParameterPtr = ptr::null_mut();
    let mut nparams: c_int = 0;
    let mut maxparams: c_int = 0;
    if bandwidth > 0 {
        // SAFETY: libvirt allocates `params`; the name is a static C string.
        let r = unsafe {
            sys::virTypedParamsAddULLong(
                &mut params,
                &mut nparams,
                &mut maxparams,
                sys::VIR_DOMAIN_BLOCK_COPY_BANDWIDTH.as_ptr(),
                bandwidth,
            )
        };
        if r < 0 {
            return Err(Error::last_error());
        }
    }
    // SAFETY: valid domain pointer and strings; `params` holds `nparams`
    // entries allocated by libvirt (or is null with 0), freed right after.
    let r = unsafe {
        sys::virDomainBlockCopy(
            dom.as_ptr(),
            disk.as_ptr(),
            xml.as_ptr(),
            params,
            nparams,
            flags as c_uint,
        )
    };
    let err = (r < 0).then(Error::last_error);
    if !params.is_null() {
        // SAFETY: allocated by virTypedParamsAddULLong above.
        unsafe { sys::virTypedParamsFree(params, nparams) };
    }
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `virDomainBlockJobAbort` of `disk` with `flags`.
pub fn block_job_abort(dom: &Domain, disk: &str, flags: u32) -> VirtResult<()> {
    let disk = cstring(disk)?;
    // SAFETY: valid domain pointer and string.
    check(unsafe { sys::virDomainBlockJobAbort(dom.as_ptr(), disk.as_ptr(), flags as c_uint) })?;
    Ok(())
}

/// A block job as `virDomainGetBlockJobInfo` reports it (bandwidth in bytes/s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockJobInfo {
    /// `virDomainBlockJobType`.
    pub kind: i32,
    /// Bytes per second, 0 for unlimited.
    pub bandwidth: u64,
    /// Progress.
    pub cur: u64,
    /// Its end (may grow for a mirror).
    pub end: u64,
}

/// `virDomainGetBlockJobInfo`: `None` when `disk` has no block job.
pub fn block_job_info(dom: &Domain, disk: &str) -> VirtResult<Option<BlockJobInfo>> {
    let disk = cstring(disk)?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: valid pointers; `info` is written by libvirt.
    let r = check(unsafe {
        sys::virDomainGetBlockJobInfo(
            dom.as_ptr(),
            disk.as_ptr(),
            &mut info,
            sys::VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES,
        )
    })?;
    Ok((r > 0).then_some(BlockJobInfo {
        kind: info.type_,
        // c_ulong: 64 bits here, 32 on 32-bit hosts.
        #[allow(clippy::unnecessary_cast)]
        bandwidth: info.bandwidth as u64,
        cur: info.cur,
        end: info.end,
    }))
}

/// `virDomainBlockJobSetSpeed` in bytes per second.
pub fn block_job_set_speed(dom: &Domain, disk: &str, bytes_per_second: u64) -> VirtResult<()> {
    let disk = cstring(disk)?;
    // SAFETY: valid domain pointer and string.
    check(unsafe {
        sys::virDomainBlockJobSetSpeed(
            dom.as_ptr(),
            disk.as_ptr(),
            bytes_per_second as std::ffi::c_ulong,
            sys::VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES,
        )
    })?;
    Ok(())
}

/// `virDomainFSFreeze` of every mounted filesystem: how many were frozen.
pub fn fs_freeze(dom: &Domain) -> VirtResult<u64> {
    // SAFETY: a valid domain pointer; no mount point list.
    let n = check(unsafe { sys::virDomainFSFreeze(dom.as_ptr(), ptr::null_mut(), 0, 0) })?;
    Ok(n as u64)
}

/// `virDomainFSThaw` of every filesystem: how many were thawed.
pub fn fs_thaw(dom: &Domain) -> VirtResult<u64> {
    // SAFETY: a valid domain pointer; no mount point list.
    let n = check(unsafe { sys::virDomainFSThaw(dom.as_ptr(), ptr::null_mut(), 0, 0) })?;
    Ok(n as u64)
}

/// One typed parameter's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    /// Any of the integer types.
    Int(i128),
    /// A double.
    Double(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
}

/// Copies `n` typed parameters at `params` (which stay libvirt's).
///
/// # Safety
/// `params` must point to `n` initialised `virTypedParameter`s (or be null
/// with `n == 0`).
pub unsafe fn typed_params(
    params: *const sys::virTypedParameter,
    n: c_int,
) -> Vec<(String, Param)> {
    let mut out = Vec::new();
    if params.is_null() {
        return out;
    }
    for i in 0..n.max(0) as usize {
        // SAFETY: the caller promises `n` initialised parameters.
        let p = unsafe { &*params.add(i) };
        // SAFETY: libvirt NUL-terminates `field` within its array.
        let name = unsafe { CStr::from_ptr(p.field.as_ptr() as *const c_char) }
            .to_string_lossy()
            .into_owned();
        // SAFETY (the union reads): `type_` says which member is set.
        let v = unsafe {
            match p.type_ as u32 {
                sys::VIR_TYPED_PARAM_INT => Param::Int(p.value.i as i128),
                sys::VIR_TYPED_PARAM_UINT => Param::Int(p.value.ui as i128),
                sys::VIR_TYPED_PARAM_LLONG => Param::Int(p.value.l as i128),
                sys::VIR_TYPED_PARAM_ULLONG => Param::Int(p.value.ul as i128),
                sys::VIR_TYPED_PARAM_DOUBLE => Param::Double(p.value.d),
                sys::VIR_TYPED_PARAM_BOOLEAN => Param::Bool(p.value.b != 0),
                sys::VIR_TYPED_PARAM_STRING if !p.value.s.is_null() => {
                    Param::Str(CStr::from_ptr(p.value.s).to_string_lossy().into_owned())
                }
                _ => continue,
            }
        };
        out.push((name, v));
    }
    out
}

/// `virDomainGetJobStats` (`completed`: the last finished job's) as the job
/// type and its typed parameters.
pub fn job_stats(dom: &Domain, completed: bool) -> VirtResult<(i32, Vec<(String, Param)>)> {
    let mut kind: c_int = 0;
    let mut params: sys::virTypedParameterPtr = ptr::null_mut();
    let mut n: c_int = 0;
    let flags = if completed {
        sys::VIR_DOMAIN_JOB_STATS_COMPLETED
    } else {
        0
    };
    // SAFETY: libvirt allocates `params` with `n` entries; copied, then freed.
    check(unsafe {
        sys::virDomainGetJobStats(dom.as_ptr(), &mut kind, &mut params, &mut n, flags)
    })?;
    // SAFETY: as returned by libvirt just above.
    let out = unsafe { typed_params(params, n) };
    if !params.is_null() {
        // SAFETY: allocated by virDomainGetJobStats.
        unsafe { sys::virTypedParamsFree(params, n) };
    }
    Ok((kind, out))
}
