//! Tensor-parallel process groups over libtorch's c10d (through the C++ shim in `csrc/`):
//! rendezvous from torchrun's environment, Gloo (CPU) or NCCL (GPU, `cuda` feature), plain
//! collectives, and Megatron's autograd mappings (copy-to / reduce-from / gather-from the TP
//! region, and an all-reduce whose backward all-reduces too).
//!
//! A launch is a data × tensor parallel [`Grid`] (Megatron's rank order); the model's
//! collectives run on its TP group, gradient averaging on its DP group.

use std::sync::Arc;

use tch::{Kind, Tensor};

use super::ffi::{RawPg, RawStore};

/// Errors of process-group setup and collectives.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A launcher variable is missing or malformed.
    #[error("environment variable {name}={value:?}: {why}")]
    Env {
        /// Variable name.
        name: &'static str,
        /// Its value (empty when unset).
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The TCPStore rendezvous failed.
    #[error("rendezvous at {addr}:{port} (rank {rank} of {world}): {msg}")]
    Rendezvous {
        /// MASTER_ADDR.
        addr: String,
        /// MASTER_PORT.
        port: u16,
        /// This rank.
        rank: i32,
        /// World size.
        world: i32,
        /// libtorch's message.
        msg: String,
    },
    /// Creating the backend failed.
    #[error("process group {backend} (rank {rank} of {world}): {msg}")]
    Backend {
        /// `gloo` or `nccl`.
        backend: &'static str,
        /// This rank.
        rank: i32,
        /// World size.
        world: i32,
        /// libtorch's message.
        msg: String,
    },
    /// The world size is not a multiple of the model-parallel size.
    #[error("world size {world} is not a multiple of tensor_model_parallel_size {tp} x pipeline_model_parallel_size {pp}")]
    Grid {
        /// World size.
        world: i32,
        /// TP size.
        tp: i32,
        /// PP size.
        pp: i32,
    },
    /// A collective failed.
    #[error("collective {op}: {msg}")]
    Collective {
        /// Which collective.
        op: &'static str,
        /// libtorch's message.
        msg: String,
    },
}

/// Reduction for [`ProcessGroup::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Sum.
    Sum = 0,
    /// Mean (accepted by Gloo in torch 2.11 and by NCCL).
    Avg = 1,
    /// Product.
    Product = 2,
    /// Minimum.
    Min = 3,
    /// Maximum.
    Max = 4,
}

/// Which backend to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors.
    Gloo,
    /// CUDA tensors (requires the `cuda` feature).
    Nccl,
}

/// Where this process sits, as torchrun (or a hand launch) describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// `RANK` (default 0).
    pub rank: i32,
    /// `WORLD_SIZE` (default 1).
    pub world: i32,
    /// `LOCAL_RANK` (default: `RANK`), the CUDA device index.
    pub local_rank: i32,
    /// `MASTER_ADDR` (default 127.0.0.1).
    pub addr: String,
    /// `MASTER_PORT` (default 29500, torchrun's).
    pub port: u16,
    /// `TORCHELASTIC_USE_AGENT_STORE=True`: the torchrun agent already serves the store, so
    /// every rank connects as a client (mirrors Python's `_create_c10d_store`).
    pub agent_store: bool,
}

fn num<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
) -> Result<T, Error> {
    match get(name) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| Error::Env {
            name,
            value: v,
            why: "not a number in range",
        }),
    }
}

impl Launch {
    /// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and
    /// TORCHELASTIC_USE_AGENT_STORE (torchrun); without RANK, Slurm's SLURM_PROCID,
    /// SLURM_NTASKS, SLURM_LOCALID and SLURM_NODELIST (`srun nemo-tool distill ...`, see
    /// [`Launch::from_vars`]); unset variables mean a single process.
    ///
    /// # Errors
    /// [`Error::Env`] for unparsable values or a rank outside the world.
    pub fn from_env() -> Result<Launch, Error> {
        Launch::from_vars(&|k| std::env::var(k).ok())
    }

    /// As [`Launch::from_env`], with the variables looked up through `get`. Under Slurm
    /// (SLURM_PROCID set, RANK not) the rank, world and local rank come from the task
    /// variables, MASTER_ADDR (unless set) is the first host of SLURM_NODELIST and
    /// MASTER_PORT (unless set) is 15000 + the last four digits of SLURM_JOB_ID, as PyTorch
    /// Lightning's `SLURMEnvironment` (NeMo's launcher under Slurm) chooses them.
    ///
    /// # Errors
    /// As [`Launch::from_env`].
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Launch, Error> {
        let slurm = get("RANK").is_none() && get("SLURM_PROCID").is_some();
        let (rank_var, world_var, local_var): (&'static str, &'static str, &'static str) = if slurm
        {
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        } else {
            ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        };
        let rank = num(get, rank_var, 0i32)?;
        let world = num(get, world_var, 1i32)?;
        let local_rank = num(get, local_var, rank)?;
        if world < 1 {
            return Err(Error::Env {
                name: world_var,
                value: world.to_string(),
                why: "must be at least 1",
            });
        }
        if rank < 0 || rank >= world {
            return Err(Error::Env {
                name: rank_var,
                value: rank.to_string(),
                why: "must be in 0..world size",
            });
        }
        let addr = match get("MASTER_ADDR") {
            Some(a) => a,
            None if slurm => match get("SLURM_NODELIST") {
                Some(list) => first_host(&list).ok_or(Error::Env {
                    name: "SLURM_NODELIST",
                    value: list.clone(),
                    why: "no host name in it",
                })?,
                None => "127.0.0.1".to_string(),
            },
            None => "127.0.0.1".to_string(),
        };
        let port = match (get("MASTER_PORT"), get("SLURM_JOB_ID")) {
            (None, Some(job)) if slurm => {
                let digits: String = job.chars().filter(char::is_ascii_digit).collect();
                let tail = &digits[digits.len().saturating_sub(4)..];
                15000 + tail.parse::<u16>().unwrap_or(0)
            }
            _ => num(get, "MASTER_PORT", 29500u16)?,
        };
        Ok(Launch {
            rank,
            world,
            local_rank,
            addr,
            port,
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True"),
        })
    }
}

/// The first host of a Slurm node list: `node[003-004,7],gpu1` -> `node003`,
/// `a1,a2` -> `a1`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // the first top-level entry (commas inside brackets belong to it)
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    let host = match entry.split_once('[') {
        None => entry.to_string(),
        Some((prefix, range)) => {
            let first = range.trim_end_matches(']').split([',', '-']).next()?;
            format!("{prefix}{first}")
        }
    };
    (!host.is_empty()).then_some(host)
}

/// A process group over all ranks. Cheap to clone; the underlying c10d backend lives until
/// the last clone (and every autograd graph built with it) is gone.
#[derive(Debug, Clone)]
pub struct ProcessGroup {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    // Declared before the store: dropped first.
    pg: Option<RawPg>,
    _store: Option<RawStore>,
    rank: i32,
    world: i32,
    /// Where this group's tensors must live (NCCL: the rank's CUDA device).
    device: tch::Device,
}

/// Megatron-core's rank layout (`parallel_state.RankGenerator` with its default order
/// `tp-cp-ep-dp-pp`, context and expert parallel sizes 1): rank = t + TP·(d + DP·p), so TP
/// ranks are adjacent, then data-parallel replicas, then pipeline stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankLayout {
    /// Tensor-parallel size.
    pub tp: i32,
    /// Data-parallel size.
    pub dp: i32,
    /// Pipeline-parallel size.
    pub pp: i32,
}

/// A parallel dimension of a [`RankLayout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// Tensor parallel.
    Tp,
    /// Data parallel.
    Dp,
    /// Pipeline parallel.
    Pp,
}

impl RankLayout {
    /// World size.
    pub fn world(&self) -> i32 {
        self.tp * self.dp * self.pp
    }

    /// `(tp rank, dp rank, pp rank)` of a global rank.
    pub fn coords(&self, rank: i32) -> (i32, i32, i32) {
        (
            rank % self.tp,
            (rank / self.tp) % self.dp,
            rank / (self.tp * self.dp),
        )
    }

    /// The global rank at `(t, d, p)`.
    pub fn rank(&self, t: i32, d: i32, p: i32) -> i32 {
        t + self.tp * (d + self.dp * p)
    }

    /// Every group along `dim`, each listing its global ranks in group-rank order; groups
    /// are ordered by their lowest rank (as megatron-core lists them).
    pub fn groups(&self, dim: Dim) -> Vec<Vec<i32>> {
        let mut out: Vec<Vec<i32>> = (0..self.world())
            .filter(|&r| self.position(r, dim) == 0)
            .map(|r| self.members(r, dim))
            .collect();
        out.sort();
        out
    }

    /// The ranks of `rank`'s group along `dim`, in group-rank order.
    pub fn members(&self, rank: i32, dim: Dim) -> Vec<i32> {
        let (t, d, p) = self.coords(rank);
        match dim {
            Dim::Tp => (0..self.tp).map(|x| self.rank(x, d, p)).collect(),
            Dim::Dp => (0..self.dp).map(|x| self.rank(t, x, p)).collect(),
            Dim::Pp => (0..self.pp).map(|x| self.rank(t, d, x)).collect(),
        }
    }

    /// `rank`'s index inside its group along `dim`.
    pub fn position(&self, rank: i32, dim: Dim) -> i32 {
        let (t, d, p) = self.coords(rank);
        match dim {
            Dim::Tp => t,
            Dim::Dp => d,
            Dim::Pp => p,
        }
    }
}

/// The data × tensor × pipeline parallel grid of a launch, in Megatron's rank order
/// ([`RankLayout`]: TP fastest, then DP, then PP). Every model collective runs on
/// [`Grid::tp`]; gradients and logged losses are averaged over [`Grid::dp`]; activations
/// and their gradients go between neighbouring stages of [`Grid::pp`]; the tied word
/// embeddings of the first and last stage are kept equal over [`Grid::embedding`].
#[derive(Debug, Clone)]
pub struct Grid {
    /// All ranks.
    pub world: ProcessGroup,
    /// This rank's tensor-parallel group.
    pub tp: ProcessGroup,
    /// This rank's data-parallel group.
    pub dp: ProcessGroup,
    /// This rank's pipeline: the same TP rank of the same replica at every stage, in stage
    /// order.
    pub pp: ProcessGroup,
    /// The first and last stage of this rank's pipeline (megatron-core's embedding group),
    /// on those two stages when PP > 1; the identity elsewhere.
    pub embedding: ProcessGroup,
    /// The sizes.
    pub layout: RankLayout,
}

impl Grid {
    /// One process: every group is the identity.
    pub fn single() -> Grid {
        let g = ProcessGroup::single();
        Grid {
            world: g.clone(),
            tp: g.clone(),
            dp: g.clone(),
            pp: g.clone(),
            embedding: g,
            layout: RankLayout {
                tp: 1,
                dp: 1,
                pp: 1,
            },
        }
    }

    /// Rendezvous and create the world, TP, DP, pipeline and embedding groups for `tp`-way
    /// tensor and `pp`-way pipeline parallelism (the data-parallel size is
    /// `WORLD_SIZE / (tp·pp)`). A group of one rank is the identity; a group equal to the
    /// world is the world group itself.
    ///
    /// # Errors
    /// [`Error::Grid`] when `tp·pp` does not divide the world size; rendezvous and backend
    /// errors as [`ProcessGroup::init`].
    pub fn init(launch: &Launch, backend: Backend, tp: i32, pp: i32) -> Result<Grid, Error> {
        let mp = tp.saturating_mul(pp);
        if tp < 1 || pp < 1 || launch.world % mp != 0 {
            return Err(Error::Grid {
                world: launch.world,
                tp,
                pp,
            });
        }
        let layout = RankLayout {
            tp,
            dp: launch.world / mp,
            pp,
        };
        if launch.world == 1 && backend == Backend::Gloo {
            return Ok(Grid::single());
        }
        let store = ProcessGroup::rendezvous(launch)?;
        let prefixed = |prefix: String| {
            store.prefixed(&prefix).map_err(|msg| Error::Rendezvous {
                addr: launch.addr.clone(),
                port: launch.port,
                rank: launch.rank,
                world: launch.world,
                msg,
            })
        };
        // one store prefix per group (named by its lowest rank), made before the world
        // group takes the store
        let me = launch.rank;
        let mut stores = Vec::new();
        for (dim, name) in [(Dim::Tp, "tp"), (Dim::Dp, "dp"), (Dim::Pp, "pp")] {
            let members = layout.members(me, dim);
            let n = members.len() as i32;
            stores.push(if n > 1 && n < launch.world {
                Some(prefixed(format!("{name}{}", members[0]))?)
            } else {
                None
            });
        }
        let pipeline = layout.members(me, Dim::Pp);
        let ends = [pipeline[0], pipeline[pipeline.len() - 1]];
        let in_embedding = pp > 1 && ends.contains(&me);
        let emb_store = if in_embedding && pp > 2 {
            Some(prefixed(format!("emb{}", ends[0]))?)
        } else {
            None
        };
        let world = ProcessGroup::group(launch, backend, store, launch.rank, launch.world)?;
        // Every rank creates its TP, then DP, then pipeline group, then (first and last
        // stages) the embedding group: each group's members reach it in the same order, so
        // no rendezvous waits on another.
        let mut groups = Vec::new();
        for (dim, st) in [Dim::Tp, Dim::Dp, Dim::Pp].into_iter().zip(stores) {
            let n = layout.members(me, dim).len() as i32;
            groups.push(match st {
                Some(st) => ProcessGroup::group(launch, backend, st, layout.position(me, dim), n)?,
                None if n == 1 => ProcessGroup::single(),
                None => world.clone(),
            });
        }
        let embedding = match emb_store {
            Some(st) => ProcessGroup::group(launch, backend, st, i32::from(me != ends[0]), 2)?,
            // PP = 2: the pipeline itself
            None if in_embedding => groups[2].clone(),
            None => ProcessGroup::single(),
        };
        let mut g = groups.into_iter();
        let mut next = || g.next().unwrap_or_else(ProcessGroup::single);
        Ok(Grid {
            tp: next(),
            dp: next(),
            pp: next(),
            embedding,
            world,
            layout,
        })
    }

    /// This rank's TP rank.
    pub fn tp_rank(&self) -> i32 {
        self.tp.rank()
    }

    /// This rank's data-parallel replica.
    pub fn dp_rank(&self) -> i32 {
        self.dp.rank()
    }

    /// The data-parallel size.
    pub fn dp_size(&self) -> i32 {
        self.dp.world()
    }

    /// This rank's pipeline stage.
    pub fn stage(&self) -> i32 {
        self.pp.rank()
    }
}

/// Store and collective timeout: long enough for a slow rank to load a checkpoint.
const TIMEOUT_MS: i64 = 30 * 60 * 1000;

impl ProcessGroup {
    /// A world of one: every collective and mapping is the identity, no store is created.
    pub fn single() -> ProcessGroup {
        ProcessGroup {
            inner: Arc::new(Inner {
                pg: None,
                _store: None,
                rank: 0,
                world: 1,
                device: tch::Device::Cpu,
            }),
        }
    }

    /// Rendezvous and create the backend. World size 1 with Gloo needs no store (see
    /// [`ProcessGroup::single`]); NCCL always creates a real group so it is exercised at
    /// world size 1 too.
    ///
    /// # Errors
    /// [`Error::Rendezvous`] / [`Error::Backend`] with libtorch's message.
    pub fn init(launch: &Launch, backend: Backend) -> Result<ProcessGroup, Error> {
        if launch.world == 1 && backend == Backend::Gloo {
            return Ok(ProcessGroup::single());
        }
        let store = Self::rendezvous(launch)?;
        Self::group(launch, backend, store, launch.rank, launch.world)
    }

    /// The TCPStore every group of this launch rendezvouses in (under its own prefix).
    fn rendezvous(launch: &Launch) -> Result<RawStore, Error> {
        let is_server = launch.rank == 0 && !launch.agent_store;
        RawStore::tcp(
            &launch.addr,
            launch.port,
            launch.world,
            is_server,
            TIMEOUT_MS,
            "nemo_tool_tp",
        )
        .map_err(|msg| Error::Rendezvous {
            addr: launch.addr.clone(),
            port: launch.port,
            rank: launch.rank,
            world: launch.world,
            msg,
        })
    }

    /// A backend over `store` where this process is `rank` of `world`.
    fn group(
        launch: &Launch,
        backend: Backend,
        store: RawStore,
        rank: i32,
        world: i32,
    ) -> Result<ProcessGroup, Error> {
        let backend_err = |backend, msg| Error::Backend {
            backend,
            rank,
            world,
            msg,
        };
        let pg = match backend {
            Backend::Gloo => {
                RawPg::gloo(&store, rank, world, TIMEOUT_MS).map_err(|m| backend_err("gloo", m))?
            }
            Backend::Nccl => {
                Self::nccl(&store, launch, rank, world).map_err(|m| backend_err("nccl", m))?
            }
        };
        let device = match backend {
            Backend::Gloo => tch::Device::Cpu,
            Backend::Nccl => tch::Device::Cuda(usize::try_from(launch.local_rank).unwrap_or(0)),
        };
        Ok(ProcessGroup {
            inner: Arc::new(Inner {
                pg: Some(pg),
                _store: Some(store),
                rank,
                world,
                device,
            }),
        })
    }

    #[cfg(feature = "cuda")]
    fn nccl(store: &RawStore, launch: &Launch, rank: i32, world: i32) -> Result<RawPg, String> {
        super::ffi::cuda_set_device(launch.local_rank)?;
        RawPg::nccl(store, rank, world, TIMEOUT_MS)
    }

    #[cfg(not(feature = "cuda"))]
    fn nccl(_store: &RawStore, _launch: &Launch, _rank: i32, _world: i32) -> Result<RawPg, String> {
        Err("built without the `cuda` feature".to_string())
    }

    /// This rank.
    pub fn rank(&self) -> i32 {
        self.inner.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> i32 {
        self.inner.world
    }

    /// `gloo`, `nccl`, or `single` for a world of one without a backend.
    pub fn backend_name(&self) -> Result<String, Error> {
        match &self.inner.pg {
            None => Ok("single".to_string()),
            Some(pg) => pg.backend_name().map_err(|msg| Error::Collective {
                op: "backend_name",
                msg,
            }),
        }
    }

    fn pg(&self) -> Option<&RawPg> {
        self.inner.pg.as_ref()
    }

    /// In-place all-reduce (no autograd).
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<(), Error> {
        match self.pg() {
            None => Ok(()),
            Some(pg) => pg
                .all_reduce(t, op as i32)
                .map_err(|msg| Error::Collective {
                    op: "all_reduce",
                    msg,
                }),
        }
    }

    /// Reduces `input` over the group and leaves chunk `rank` of the result in a new tensor
    /// of `input.numel() / world` elements (no autograd). `input` must divide evenly.
    ///
    /// # Errors
    /// [`Error::Collective`].
    pub fn reduce_scatter(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor, Error> {
        let n = input.numel() as i64;
        let w = i64::from(self.world());
        let Some(pg) = self.pg() else {
            return Ok(input.reshape([-1]).shallow_clone());
        };
        if n % w != 0 {
            return Err(Error::Collective {
                op: "reduce_scatter",
                msg: format!("{n} elements do not split {w} ways"),
            });
        }
        let mut inp = input.reshape([-1]).contiguous();
        let mut out = inp.new_empty([n / w], (inp.kind(), inp.device()));
        pg.reduce_scatter(&mut out, &mut inp, op as i32)
            .map_err(|msg| Error::Collective {
                op: "reduce_scatter",
                msg,
            })?;
        Ok(out)
    }

    /// Every rank's `input` (same size everywhere) concatenated in rank order (no autograd).
    ///
    /// # Errors
    /// [`Error::Collective`].
    pub fn all_gather_flat(&self, input: &Tensor) -> Result<Tensor, Error> {
        let Some(pg) = self.pg() else {
            return Ok(input.reshape([-1]).shallow_clone());
        };
        let mut inp = input.reshape([-1]).contiguous();
        let n = inp.numel() as i64 * i64::from(self.world());
        let mut out = inp.new_empty([n], (inp.kind(), inp.device()));
        pg.all_gather_into(&mut out, &mut inp)
            .map_err(|msg| Error::Collective {
                op: "all_gather",
                msg,
            })?;
        Ok(out)
    }

    /// Sends `t` to group rank `dst` (blocking, no autograd): a pipeline stage's activations
    /// or gradients to its neighbour, matched with [`ProcessGroup::recv`] by `tag`.
    ///
    /// # Errors
    /// [`Error::Collective`]; a group of one has no one to send to.
    pub fn send(&self, t: &Tensor, dst: i32, tag: i32) -> Result<(), Error> {
        let pg = self.pg().ok_or_else(|| Error::Collective {
            op: "send",
            msg: "a group of one rank has no peer".to_string(),
        })?;
        let mut c = t.contiguous();
        pg.send(&mut c, dst, tag)
            .map_err(|msg| Error::Collective { op: "send", msg })
    }

    /// Receives into `t` (its shape and type must be the sender's) from group rank `src`.
    ///
    /// # Errors
    /// As [`ProcessGroup::send`].
    pub fn recv(&self, t: &mut Tensor, src: i32, tag: i32) -> Result<(), Error> {
        let pg = self.pg().ok_or_else(|| Error::Collective {
            op: "recv",
            msg: "a group of one rank has no peer".to_string(),
        })?;
        pg.recv(t, src, tag)
            .map_err(|msg| Error::Collective { op: "recv", msg })
    }

    /// Sends each `(tensor, dst)` and receives into each `(tensor, src)` (shapes and types
    /// as the peers send them), all posted before any is awaited: a pipeline stage's
    /// activations and gradients cross in both directions without a deadlock. Tensors
    /// travel on the group's device; received ones come back there.
    ///
    /// # Errors
    /// [`Error::Collective`]; a group of one has no one to exchange with.
    pub fn exchange(
        &self,
        sends: &[(&Tensor, i32)],
        recvs: &mut [(Tensor, i32)],
        tag: i32,
    ) -> Result<(), Error> {
        if sends.is_empty() && recvs.is_empty() {
            return Ok(());
        }
        let pg = self.pg().ok_or_else(|| Error::Collective {
            op: "exchange",
            msg: "a group of one rank has no peer".to_string(),
        })?;
        let dev = self.inner.device;
        let mut s: Vec<(Tensor, i32)> = sends
            .iter()
            .map(|(t, d)| (t.detach().to_device(dev).contiguous(), *d))
            .collect();
        for (t, _) in recvs.iter_mut() {
            if t.device() != dev || !t.is_contiguous() {
                *t = t.to_device(dev).contiguous();
            }
        }
        pg.exchange(&mut s, recvs, tag)
            .map_err(|msg| Error::Collective {
                op: "exchange",
                msg,
            })
    }

    /// Sends named fp32 tensors to group rank `dst` (for [`ProcessGroup::recv_named`]): a
    /// header (names and shapes as JSON) first, then the tensors.
    ///
    /// # Errors
    /// As [`ProcessGroup::exchange`].
    pub fn send_named(&self, tensors: &[(String, Tensor)], dst: i32) -> Result<(), Error> {
        let head: Vec<(&str, Vec<i64>)> = tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t.size()))
            .collect();
        let bytes = serde_json::to_vec(&head).map_err(|e| Error::Collective {
            op: "send_named",
            msg: e.to_string(),
        })?;
        let len = Tensor::from_slice(&[bytes.len() as i64]);
        self.exchange(&[(&len, dst)], &mut [], 1)?;
        self.exchange(&[(&Tensor::from_slice(&bytes), dst)], &mut [], 1)?;
        for (_, t) in tensors {
            self.exchange(&[(&t.to_kind(Kind::Float), dst)], &mut [], 1)?;
        }
        Ok(())
    }

    /// Receives what [`ProcessGroup::send_named`] sent from group rank `src` (on the CPU).
    ///
    /// # Errors
    /// As [`ProcessGroup::exchange`]; a malformed header.
    pub fn recv_named(&self, src: i32) -> Result<Vec<(String, Tensor)>, Error> {
        let bad = |msg: String| Error::Collective {
            op: "recv_named",
            msg,
        };
        let mut r = [(Tensor::zeros([1], (Kind::Int64, tch::Device::Cpu)), src)];
        self.exchange(&[], &mut r, 1)?;
        let n = r[0].0.f_int64_value(&[0]).map_err(|e| bad(e.to_string()))?;
        if n < 0 {
            return Err(bad(format!("header of {n} bytes")));
        }
        let mut r = [(Tensor::zeros([n], (Kind::Uint8, tch::Device::Cpu)), src)];
        self.exchange(&[], &mut r, 1)?;
        let raw = r[0].0.to_device(tch::Device::Cpu);
        let len = usize::try_from(n).unwrap_or(0);
        let mut bytes = vec![0u8; len];
        raw.f_copy_data(&mut bytes, len)
            .map_err(|e| bad(e.to_string()))?;
        let head: Vec<(String, Vec<i64>)> =
            serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut out = Vec::with_capacity(head.len());
        for (name, shape) in head {
            let mut r = [(Tensor::zeros(&shape, (Kind::Float, tch::Device::Cpu)), src)];
            self.exchange(&[], &mut r, 1)?;
            let [(t, _)] = r;
            out.push((name, t.to_device(tch::Device::Cpu)));
        }
        Ok(out)
    }

    /// In-place broadcast from `root` (no autograd).
    pub fn broadcast(&self, t: &mut Tensor, root: i32) -> Result<(), Error> {
        match self.pg() {
            None => Ok(()),
            Some(pg) => pg.broadcast(t, root).map_err(|msg| Error::Collective {
                op: "broadcast",
                msg,
            }),
        }
    }

    /// Every rank's `t`, in rank order (no autograd).
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>, Error> {
        let mut input = t.contiguous();
        match self.pg() {
            None => Ok(vec![input]),
            Some(pg) => {
                let mut outs: Vec<Tensor> = (0..self.world()).map(|_| input.empty_like()).collect();
                pg.all_gather(&mut outs, &mut input)
                    .map_err(|msg| Error::Collective {
                        op: "all_gather",
                        msg,
                    })?;
                Ok(outs)
            }
        }
    }

    /// Blocks until every rank arrives.
    pub fn barrier(&self) -> Result<(), Error> {
        match self.pg() {
            None => Ok(()),
            Some(pg) => pg
                .barrier()
                .map_err(|msg| Error::Collective { op: "barrier", msg }),
        }
    }

    fn mapping(&self, which: u8, op: &'static str, x: &Tensor) -> Result<Tensor, Error> {
        match self.pg() {
            None => Ok(x.shallow_clone()),
            Some(pg) => pg
                .mapping(which, x)
                .map_err(|msg| Error::Collective { op, msg }),
        }
    }

    /// Megatron `copy_to_tensor_model_parallel_region`: identity forward, all-reduce backward.
    pub fn copy_to_tp(&self, x: &Tensor) -> Result<Tensor, Error> {
        self.mapping(0, "copy_to_tp", x)
    }

    /// Megatron `reduce_from_tensor_model_parallel_region`: all-reduce (sum) forward,
    /// identity backward.
    pub fn reduce_from_tp(&self, x: &Tensor) -> Result<Tensor, Error> {
        self.mapping(1, "reduce_from_tp", x)
    }

    /// Megatron `gather_from_tensor_model_parallel_region`: all-gather along the last dim
    /// forward, this rank's slice backward.
    pub fn gather_from_tp(&self, x: &Tensor) -> Result<Tensor, Error> {
        self.mapping(2, "gather_from_tp", x)
    }

    /// All-reduce (sum) in both directions: for a value every rank's loss term uses, when
    /// the total loss is the sum of the ranks' terms.
    pub fn all_reduce_autograd(&self, x: &Tensor) -> Result<Tensor, Error> {
        self.mapping(3, "all_reduce_autograd", x)
    }

    /// All-reduce max of a tensor with no gradient (returns a new tensor).
    pub fn max_no_grad(&self, x: &Tensor) -> Result<Tensor, Error> {
        let mut m = x.detach().contiguous().copy();
        self.all_reduce(&mut m, ReduceOp::Max)?;
        Ok(m)
    }

    /// Sum of a float scalar over ranks.
    pub fn sum_f64(&self, v: f64) -> Result<f64, Error> {
        let mut t = Tensor::from_slice(&[v])
            .to_kind(Kind::Double)
            .to_device(self.inner.device);
        self.all_reduce(&mut t, ReduceOp::Sum)?;
        t.f_double_value(&[0]).map_err(|e| Error::Collective {
            op: "sum_f64",
            msg: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> Result<Launch, Error> {
        let map: std::collections::HashMap<String, String> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(&|k| map.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_variables() {
        let l = vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29513"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((l.rank, l.world, l.local_rank, l.port), (1, 2, 1, 29513));
        assert_eq!(l.addr, "10.0.0.1");
        assert!(l.agent_store);
        let d = vars(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (d.rank, d.world, d.port, d.agent_store),
            (0, 1, 29500, false)
        );
    }

    #[test]
    fn rank_layout_is_megatrons() {
        // values printed by megatron-core 0.16.1's RankGenerator(tp=2, dp=2, pp=2)
        let l = RankLayout {
            tp: 2,
            dp: 2,
            pp: 2,
        };
        assert_eq!(l.groups(Dim::Tp), [[0, 1], [2, 3], [4, 5], [6, 7]]);
        assert_eq!(l.groups(Dim::Dp), [[0, 2], [1, 3], [4, 6], [5, 7]]);
        assert_eq!(l.groups(Dim::Pp), [[0, 4], [1, 5], [2, 6], [3, 7]]);
        for r in 0..l.world() {
            let (t, d, p) = l.coords(r);
            assert_eq!(l.rank(t, d, p), r);
            assert!(l.members(r, Dim::Dp).contains(&r));
        }
    }

    #[test]
    fn reads_slurm_variables() {
        let l = vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODELIST", "gpu[012-013,020],cpu7"),
            ("SLURM_JOB_ID", "4711234"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((l.rank, l.world, l.local_rank), (5, 8, 1));
        assert_eq!((l.addr.as_str(), l.port), ("gpu012", 16234));
        // torchrun inside an allocation wins; an explicit MASTER_* wins under srun
        let t = vars(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("SLURM_PROCID", "3")])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((t.rank, t.world), (0, 2));
        let m = vars(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("MASTER_ADDR", "10.1.1.1"),
            ("MASTER_PORT", "29999"),
            ("SLURM_JOB_ID", "12"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.addr.as_str(), m.port), ("10.1.1.1", 29999));
        assert_eq!(first_host("a1,a2").as_deref(), Some("a1"));
        assert_eq!(first_host("n[7]").as_deref(), Some("n7"));
        assert_eq!(first_host(""), None);
        let e = vars(&[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "2")])
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.contains("SLURM_PROCID")),
            "{e:?}"
        );
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = vars(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("RANK=\"2\"")));
        let e = vars(&[("MASTER_PORT", "http")])
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("MASTER_PORT")));
        assert!(vars(&[("WORLD_SIZE", "0")]).is_err());
    }

    #[test]
    fn single_group_is_the_identity() {
        let pg = ProcessGroup::single();
        let x = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let y = pg.reduce_from_tp(&pg.copy_to_tp(&x).unwrap_or_else(|e| panic!("{e}")));
        let y = y.unwrap_or_else(|e| panic!("{e}"));
        (y * 3.0).sum(Kind::Float).backward();
        assert_eq!(
            Vec::<f32>::try_from(x.grad()).unwrap_or_default(),
            vec![3.0, 3.0]
        );
        assert_eq!(pg.backend_name().ok().as_deref(), Some("single"));
        assert!((pg.sum_f64(2.5).unwrap_or(0.0) - 2.5).abs() < 1e-12);
    }

    /// A real Gloo group of one process (the shim's code paths, unlike `single`).
    fn gloo_of_one() -> ProcessGroup {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        let store = RawStore::tcp("127.0.0.1", port, 1, true, 10_000, "t")
            .unwrap_or_else(|e| panic!("{e}"));
        let pg = RawPg::gloo(&store, 0, 1, 10_000).unwrap_or_else(|e| panic!("{e}"));
        ProcessGroup {
            inner: Arc::new(Inner {
                pg: Some(pg),
                _store: Some(store),
                rank: 0,
                world: 1,
                device: tch::Device::Cpu,
            }),
        }
    }

    #[test]
    fn shim_mappings_run_forward_and_backward() {
        let pg = gloo_of_one();
        assert_eq!(pg.backend_name().ok().as_deref(), Some("gloo"));
        let x = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
        let ok = |r: Result<Tensor, Error>| r.unwrap_or_else(|e| panic!("{e}"));
        let y = ok(pg.copy_to_tp(&x));
        let y = ok(pg.reduce_from_tp(&y));
        let y = ok(pg.gather_from_tp(&y.view([1, 3])));
        let y = ok(pg.all_reduce_autograd(&y));
        assert_eq!(
            Vec::<f32>::try_from(y.view([3]).copy()).unwrap_or_default(),
            vec![1.0, -2.0, 3.0]
        );
        (y * 2.0).sum(Kind::Float).backward();
        assert_eq!(
            Vec::<f32>::try_from(x.grad()).unwrap_or_default(),
            vec![2.0; 3]
        );
        let mut t = Tensor::from_slice(&[4.0f32]);
        pg.all_reduce(&mut t, ReduceOp::Max)
            .unwrap_or_else(|e| panic!("{e}"));
        pg.broadcast(&mut t, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pg.all_gather(&t).map(|v| v.len()).ok(), Some(1));
        pg.barrier().unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn backward_after_the_group_is_gone_is_an_error() {
        let pg = gloo_of_one();
        let x = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let y = pg.copy_to_tp(&x).unwrap_or_else(|e| panic!("{e}"));
        drop(pg);
        let e = y.sum(Kind::Float).f_backward().err().map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("destroyed before the backward")));
    }

    #[test]
    fn store_connect_failure_is_an_error() {
        // a client whose server never comes: TCPStore fails after the timeout
        let l = Launch {
            rank: 1,
            world: 2,
            local_rank: 1,
            addr: "127.0.0.1".to_string(),
            port: 1,
            agent_store: false,
        };
        let store = RawStore::tcp(&l.addr, l.port, 2, false, 200, "t");
        assert!(store.is_err());
    }
}
