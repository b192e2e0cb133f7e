//! File formats, each parsed from bytes without executing anything: the
//! `.nemo` container (`archive`, `tar_write`), torch.save zip + pickle
//! (`torch`), distributed checkpoints (`dist`: torch_dist / DCP and zarr),
//! Hugging Face `safetensors`, NumPy `npy`, Megatron `indexed` datasets, the
//! offline teacher cache of `distill` (`kd_cache`), and
//! the element decoding shared by checksums and diffs (`numeric`).

pub mod archive;
pub mod dist;
pub mod indexed;
pub mod kd_cache;
pub mod members;
pub mod npy;
pub mod numeric;
pub mod safetensors;
pub mod tar_write;
pub mod torch;
