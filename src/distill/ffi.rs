//! The only `unsafe` of the distill engine: declarations of the C++ shim (`csrc/`) and the
//! raw-pointer conversions between tch tensors and `at::Tensor*`. Everything else goes
//! through the safe wrappers in [`super::parallel`] and [`super::weights`].

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn nemo_shim_last_error() -> *const c_char;
    fn nemo_shim_store_new(
        host: *const c_char,
        port: u16,
        world: c_int,
        is_server: c_int,
        timeout_ms: i64,
        prefix: *const c_char,
    ) -> *mut c_void;
    fn nemo_shim_store_free(s: *mut c_void);
    fn nemo_shim_store_prefixed(store: *mut c_void, prefix: *const c_char) -> *mut c_void;
    fn nemo_shim_pg_gloo_new(
        store: *mut c_void,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
    ) -> *mut c_void;
    fn nemo_shim_pg_free(pg: *mut c_void);
    fn nemo_shim_pg_backend_name(pg: *mut c_void, buf: *mut c_char, cap: usize) -> c_int;
    fn nemo_shim_all_reduce(pg: *mut c_void, t: *mut C_tensor, op: c_int) -> c_int;
    fn nemo_shim_broadcast(pg: *mut c_void, t: *mut C_tensor, root: c_int) -> c_int;
    fn nemo_shim_all_gather(
        pg: *mut c_void,
        outs: *mut *mut C_tensor,
        n: c_int,
        input: *mut C_tensor,
    ) -> c_int;
    fn nemo_shim_barrier(pg: *mut c_void) -> c_int;
    fn nemo_shim_send(pg: *mut c_void, t: *mut C_tensor, dst: c_int, tag: c_int) -> c_int;
    fn nemo_shim_recv(pg: *mut c_void, t: *mut C_tensor, src: c_int, tag: c_int) -> c_int;
    fn nemo_shim_exchange(
        pg: *mut c_void,
        sends: *mut *mut C_tensor,
        dsts: *const c_int,
        n_send: c_int,
        recvs: *mut *mut C_tensor,
        srcs: *const c_int,
        n_recv: c_int,
        tag: c_int,
    ) -> c_int;
    fn nemo_shim_reduce_scatter(
        pg: *mut c_void,
        out: *mut C_tensor,
        input: *mut C_tensor,
        op: c_int,
    ) -> c_int;
    fn nemo_shim_all_gather_into(
        pg: *mut c_void,
        out: *mut C_tensor,
        input: *mut C_tensor,
    ) -> c_int;
    fn nemo_shim_tp_copy(pg: *mut c_void, x: *mut C_tensor) -> *mut C_tensor;
    fn nemo_shim_tp_reduce(pg: *mut c_void, x: *mut C_tensor) -> *mut C_tensor;
    fn nemo_shim_tp_gather_last(pg: *mut c_void, x: *mut C_tensor) -> *mut C_tensor;
    fn nemo_shim_tp_all_reduce(pg: *mut c_void, x: *mut C_tensor) -> *mut C_tensor;
    #[cfg(feature = "cuda")]
    fn nemo_shim_pg_nccl_new(
        store: *mut c_void,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
    ) -> *mut c_void;
    #[cfg(feature = "cuda")]
    fn nemo_shim_cuda_set_device(idx: c_int) -> c_int;
    #[cfg(feature = "cuda")]
    fn nemo_shim_cuda_device_name(idx: c_int, buf: *mut c_char, cap: usize) -> c_int;
}

/// The shim's last error message on this thread.
fn last_error() -> String {
    // SAFETY: the shim returns a pointer to a thread-local NUL-terminated std::string buffer,
    // valid until the next shim call on this thread; we copy it out at once.
    unsafe { CStr::from_ptr(nemo_shim_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn check(rc: c_int) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(last_error())
    }
}

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// An owned c10d store (TCPStore, maybe under a PrefixStore).
#[derive(Debug)]
pub(crate) struct RawStore(*mut c_void);

// SAFETY: a c10d store (TCPStore/PrefixStore) is a thread-safe object; the handle is only a
// pointer to it, freed once in Drop.
unsafe impl Send for RawStore {}
// SAFETY: as above.
unsafe impl Sync for RawStore {}

impl RawStore {
    pub(crate) fn tcp(
        host: &str,
        port: u16,
        world: i32,
        is_server: bool,
        timeout_ms: i64,
        prefix: &str,
    ) -> Result<RawStore, String> {
        let (h, p) = (cstring(host)?, cstring(prefix)?);
        // SAFETY: both strings outlive the call; the shim copies them.
        let s = unsafe {
            nemo_shim_store_new(
                h.as_ptr(),
                port,
                world,
                c_int::from(is_server),
                timeout_ms,
                p.as_ptr(),
            )
        };
        if s.is_null() {
            Err(last_error())
        } else {
            Ok(RawStore(s))
        }
    }

    /// The same store with every key under `prefix/` (a subgroup's rendezvous space).
    pub(crate) fn prefixed(&self, prefix: &str) -> Result<RawStore, String> {
        let p = cstring(prefix)?;
        // SAFETY: the store pointer is live; the shim copies the string and takes its own
        // reference to the underlying store.
        let s = unsafe { nemo_shim_store_prefixed(self.0, p.as_ptr()) };
        if s.is_null() {
            Err(last_error())
        } else {
            Ok(RawStore(s))
        }
    }
}

impl Drop for RawStore {
    fn drop(&mut self) {
        // SAFETY: created by nemo_shim_store_new, freed once; the process group holds its own
        // reference to the store, so this may run before the group is dropped.
        unsafe { nemo_shim_store_free(self.0) }
    }
}

/// An owned c10d backend (Gloo or NCCL).
#[derive(Debug)]
pub(crate) struct RawPg(*mut c_void);

// SAFETY: c10d backends are thread-safe objects; the handle is only a pointer to one.
unsafe impl Send for RawPg {}
// SAFETY: as above; c10d serialises collectives internally.
unsafe impl Sync for RawPg {}

fn tensor_out(p: *mut C_tensor) -> Result<Tensor, String> {
    if p.is_null() {
        Err(last_error())
    } else {
        // SAFETY: the shim returns a freshly `new`ed at::Tensor*, whose ownership tch takes.
        Ok(unsafe { Tensor::from_ptr(p) })
    }
}

impl RawPg {
    pub(crate) fn gloo(
        store: &RawStore,
        rank: i32,
        world: i32,
        timeout_ms: i64,
    ) -> Result<Self, String> {
        // SAFETY: the store pointer is live; the group keeps its own reference to it.
        let p = unsafe { nemo_shim_pg_gloo_new(store.0, rank, world, timeout_ms) };
        if p.is_null() {
            Err(last_error())
        } else {
            Ok(RawPg(p))
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn nccl(
        store: &RawStore,
        rank: i32,
        world: i32,
        timeout_ms: i64,
    ) -> Result<Self, String> {
        // SAFETY: as for gloo.
        let p = unsafe { nemo_shim_pg_nccl_new(store.0, rank, world, timeout_ms) };
        if p.is_null() {
            Err(last_error())
        } else {
            Ok(RawPg(p))
        }
    }

    pub(crate) fn backend_name(&self) -> Result<String, String> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: buf is writable for its full length, which we pass.
        check(unsafe { nemo_shim_pg_backend_name(self.0, buf.as_mut_ptr(), buf.len()) })?;
        // SAFETY: the shim NUL-terminates within cap.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    pub(crate) fn all_reduce(&self, t: &mut Tensor, op: c_int) -> Result<(), String> {
        // SAFETY: live group and tensor; the call blocks until done (Gloo) or is stream-ordered (NCCL).
        check(unsafe { nemo_shim_all_reduce(self.0, t.as_mut_ptr(), op) })
    }

    pub(crate) fn broadcast(&self, t: &mut Tensor, root: i32) -> Result<(), String> {
        // SAFETY: as all_reduce.
        check(unsafe { nemo_shim_broadcast(self.0, t.as_mut_ptr(), root) })
    }

    pub(crate) fn all_gather(&self, outs: &mut [Tensor], input: &mut Tensor) -> Result<(), String> {
        let n = c_int::try_from(outs.len()).map_err(|_| "too many outputs".to_string())?;
        let mut ptrs: Vec<*mut C_tensor> = outs.iter_mut().map(|t| t.as_mut_ptr()).collect();
        // SAFETY: ptrs holds n live tensor handles for the duration of the call.
        check(unsafe { nemo_shim_all_gather(self.0, ptrs.as_mut_ptr(), n, input.as_mut_ptr()) })
    }

    pub(crate) fn reduce_scatter(
        &self,
        out: &mut Tensor,
        input: &mut Tensor,
        op: c_int,
    ) -> Result<(), String> {
        // SAFETY: live group and tensors for the duration of the blocking call.
        check(unsafe { nemo_shim_reduce_scatter(self.0, out.as_mut_ptr(), input.as_mut_ptr(), op) })
    }

    pub(crate) fn all_gather_into(
        &self,
        out: &mut Tensor,
        input: &mut Tensor,
    ) -> Result<(), String> {
        // SAFETY: as reduce_scatter.
        check(unsafe { nemo_shim_all_gather_into(self.0, out.as_mut_ptr(), input.as_mut_ptr()) })
    }

    pub(crate) fn send(&self, t: &mut Tensor, dst: c_int, tag: c_int) -> Result<(), String> {
        // SAFETY: live group and tensor for the duration of the blocking call.
        check(unsafe { nemo_shim_send(self.0, t.as_mut_ptr(), dst, tag) })
    }

    pub(crate) fn recv(&self, t: &mut Tensor, src: c_int, tag: c_int) -> Result<(), String> {
        // SAFETY: as send; the shim writes into `t`'s storage.
        check(unsafe { nemo_shim_recv(self.0, t.as_mut_ptr(), src, tag) })
    }

    /// Every send and receive posted at once, then all awaited.
    pub(crate) fn exchange(
        &self,
        sends: &mut [(Tensor, c_int)],
        recvs: &mut [(Tensor, c_int)],
        tag: c_int,
    ) -> Result<(), String> {
        let mut sp: Vec<*mut C_tensor> = sends.iter_mut().map(|(t, _)| t.as_mut_ptr()).collect();
        let sd: Vec<c_int> = sends.iter().map(|(_, d)| *d).collect();
        let mut rp: Vec<*mut C_tensor> = recvs.iter_mut().map(|(t, _)| t.as_mut_ptr()).collect();
        let rs: Vec<c_int> = recvs.iter().map(|(_, s)| *s).collect();
        // SAFETY: live group; the pointer arrays and the tensors they point to outlive the
        // blocking call, which writes only into the receive tensors' storage.
        check(unsafe {
            nemo_shim_exchange(
                self.0,
                sp.as_mut_ptr(),
                sd.as_ptr(),
                sp.len() as c_int,
                rp.as_mut_ptr(),
                rs.as_ptr(),
                rp.len() as c_int,
                tag,
            )
        })
    }

    pub(crate) fn barrier(&self) -> Result<(), String> {
        // SAFETY: live group.
        check(unsafe { nemo_shim_barrier(self.0) })
    }

    /// Applies one of the autograd mappings (0 copy, 1 reduce, 2 gather-last, 3 all-reduce).
    pub(crate) fn mapping(&self, which: u8, x: &Tensor) -> Result<Tensor, String> {
        // The shim reads the tensor through the pointer and does not keep it; graph nodes keep
        // the group's registry id, so a backward after the group is freed is an error.
        let xp = x.as_ptr() as *mut C_tensor;
        // SAFETY: live group and tensor handle; the result is a new owned tensor or null.
        let p = unsafe {
            match which {
                0 => nemo_shim_tp_copy(self.0, xp),
                1 => nemo_shim_tp_reduce(self.0, xp),
                2 => nemo_shim_tp_gather_last(self.0, xp),
                _ => nemo_shim_tp_all_reduce(self.0, xp),
            }
        };
        tensor_out(p)
    }
}

impl Drop for RawPg {
    fn drop(&mut self) {
        // SAFETY: created by a nemo_shim_pg_*_new, freed once.
        unsafe { nemo_shim_pg_free(self.0) }
    }
}

/// `torch.cuda.set_device(idx)`.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_set_device(idx: i32) -> Result<(), String> {
    // SAFETY: plain call.
    check(unsafe { nemo_shim_cuda_set_device(idx) })
}

/// The CUDA device's name (`torch.cuda.get_device_name(idx)`).
#[cfg(feature = "cuda")]
pub(crate) fn cuda_device_name(idx: i32) -> Result<String, String> {
    let mut buf = vec![0 as c_char; 256];
    // SAFETY: the shim writes at most `cap` bytes, NUL-terminated, into `buf`.
    check(unsafe { nemo_shim_cuda_device_name(idx, buf.as_mut_ptr(), buf.len()) })?;
    // SAFETY: NUL-terminated by the shim (snprintf).
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// Copies the row-major little-endian bytes of a `kind` tensor shaped like `dst` into `dst`
/// (any view, any dtype: `copy_` converts): one copy, straight from the (mapped) bytes.
pub(crate) fn copy_bytes_into(dst: &mut Tensor, bytes: &[u8], kind: Kind) -> Result<(), String> {
    let es = kind.elt_size_in_bytes();
    let numel = dst.numel();
    if es == 0 || Some(bytes.len()) != numel.checked_mul(es) {
        return Err(format!(
            "{} bytes of {kind:?} cannot fill a tensor of shape {:?}",
            bytes.len(),
            dst.size()
        ));
    }
    if numel == 0 {
        return Ok(());
    }
    let shape = dst.size();
    // SAFETY: `src` borrows `bytes` (its length checked above against the shape) only for
    // this function, is only read (it is the source of copy_) and is dropped before return.
    // from_blob keeps no ownership (no deleter).
    let src = unsafe { Tensor::from_blob(bytes.as_ptr(), &shape, &[], kind, Device::Cpu) };
    dst.f_copy_(&src).map_err(|e| e.to_string())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn mallopt(param: c_int, value: c_int) -> c_int;
}

/// Keeps freed tensor memory in the process heap. libtorch's CPU allocator is plain
/// `malloc`, and glibc serves blocks above its mmap threshold (128 KiB at first) with fresh
/// `mmap`s that are unmapped again on free: a training step that frees and reallocates its
/// activations then page-faults every page of them anew (8% of a CPU step in profiles; +5%
/// tokens/s without it in `cargo xtask bench distill`). Errors are ignored: only a hint.
pub(crate) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc <malloc.h>: M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3; 32 MiB is the
        // largest mmap threshold glibc accepts on 64-bit.
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_THRESHOLD: c_int = -3;
        // SAFETY: mallopt only changes allocator parameters; it is called before the
        // training threads start allocating and takes no pointers.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, 256 << 20);
        }
    }
}
