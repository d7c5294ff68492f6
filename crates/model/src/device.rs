//! A shard on the device a worker was started with (`--device cpu|cuda[:N]`): the one type
//! the worker steps, whatever the device ([`LoadedShard`]), and the device's operations
//! ([`DeviceOps`]), opened before the load so that its collectives (NCCL) can use its stream.

use std::ops::Range;
use std::sync::Arc;

use tpserve_comm::Collective;
use tpserve_gguf::Gguf;
use tpserve_types::device::Device;
use tpserve_types::kv::KvLayout;
use tpserve_types::plan::RankShard;

use crate::config::ModelConfig;
use crate::model::{Model, ModelError, SeqChunk, StageOutput};
use crate::ops::{Cpu, KvMemory, Ops};

/// A device's operation set, opened.
#[derive(Clone)]
pub enum DeviceOps {
    /// The host CPU.
    Cpu(Cpu),
    /// A CUDA GPU.
    #[cfg(feature = "cuda")]
    Cuda(crate::ops::cuda::Cuda),
}

impl DeviceOps {
    /// Opens `device`: for a GPU, a context and a stream on it. A GPU asked of a binary built
    /// without CUDA is refused with how to build one.
    pub fn open(device: Device) -> Result<Self, ModelError> {
        match device {
            Device::Cpu => Ok(Self::Cpu(Cpu)),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => Ok(Self::Cuda(crate::ops::cuda::Cuda::new(n as usize)?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(ModelError::Device {
                device: device.to_string(),
                message: "this binary was built without CUDA; build it with `cargo build --release --features cuda` (README.md), or use --device cpu".into(),
            }),
        }
    }

    /// Whether this binary can run on CUDA GPUs and talk NCCL between them.
    pub const fn cuda_built() -> bool {
        cfg!(feature = "cuda")
    }

    /// The device in words ("cpu (avx512-vnni)", "cuda:0 (NVIDIA H200, 139 GiB)").
    pub fn describe(&self) -> String {
        match self {
            Self::Cpu(o) => o.describe(),
            #[cfg(feature = "cuda")]
            Self::Cuda(o) => o.describe(),
        }
    }

    /// The GPU's UUID (empty on the CPU): two workers on one GPU report the same one.
    pub fn gpu_id(&self) -> String {
        match self {
            Self::Cpu(_) => String::new(),
            #[cfg(feature = "cuda")]
            Self::Cuda(o) => o.gpu_id(),
        }
    }

    /// Loads `shard` of `g` onto this device with KV memory for `kv`'s blocks.
    pub fn load(
        &self,
        g: &Gguf,
        shard: &RankShard,
        tp: Arc<dyn Collective>,
        pp: Option<Arc<dyn Collective>>,
        kv: &KvLayout,
    ) -> Result<Box<dyn LoadedShard>, ModelError> {
        match self {
            Self::Cpu(o) => OnDevice::load(*o, g, shard, tp, pp, kv),
            #[cfg(feature = "cuda")]
            Self::Cuda(o) => OnDevice::load(o.clone(), g, shard, tp, pp, kv),
        }
    }
}

/// A loaded shard and its KV memory on some device: what a worker steps.
pub trait LoadedShard: Send + Sync {
    /// [`Model::forward_stage`] against this shard's KV memory.
    fn forward(&mut self, batch: &[SeqChunk<'_>], slice_later: bool) -> Result<StageOutput, ModelError>;
    /// [`Model::head_logits`]: this rank's slice of the output projection for final hidden
    /// states the last stage reported.
    fn head_logits(&mut self, hidden: &[f32]) -> Result<Vec<f32>, ModelError>;
    /// The whole model's hyper-parameters.
    fn config(&self) -> &ModelConfig;
    /// The vocabulary ids whose logits this rank returns (empty on a rank without rows of
    /// the output projection).
    fn vocab_range(&self) -> Range<usize>;
    /// Bytes reserved for the KV cache.
    fn kv_bytes(&self) -> u64;
    /// The layout the KV memory was sized by.
    fn kv_layout(&self) -> &KvLayout;
    /// Weight bytes this rank holds.
    fn weight_bytes(&self) -> u64;
    /// Bytes repacking added ([`Model::repacked_bytes`]).
    fn repacked_bytes(&self) -> usize;
    /// [`Model::prefault`].
    fn prefault(&self, progress: &mut dyn FnMut(u64, u64)) -> usize;
    /// The device in words.
    fn device(&self) -> String;
}

struct OnDevice<O: Ops> {
    model: Model<O>,
    kv: O::Kv,
}

impl<O: Ops> OnDevice<O> {
    fn load(
        ops: O,
        g: &Gguf,
        shard: &RankShard,
        tp: Arc<dyn Collective>,
        pp: Option<Arc<dyn Collective>>,
        kv: &KvLayout,
    ) -> Result<Box<dyn LoadedShard>, ModelError> {
        let model = Model::load_on(ops, g, shard, tp, pp)?;
        let kv = model.kv_pool(kv)?;
        Ok(Box::new(Self { model, kv }))
    }
}

impl<O: Ops> LoadedShard for OnDevice<O> {
    fn forward(&mut self, batch: &[SeqChunk<'_>], slice_later: bool) -> Result<StageOutput, ModelError> {
        self.model.forward_stage(&mut self.kv, batch, slice_later)
    }
    fn head_logits(&mut self, hidden: &[f32]) -> Result<Vec<f32>, ModelError> {
        self.model.head_logits(hidden)
    }
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }
    fn vocab_range(&self) -> Range<usize> {
        self.model.vocab_range()
    }
    fn kv_bytes(&self) -> u64 {
        self.kv.bytes()
    }
    fn kv_layout(&self) -> &KvLayout {
        self.kv.layout()
    }
    fn weight_bytes(&self) -> u64 {
        self.model.weight_bytes()
    }
    fn repacked_bytes(&self) -> usize {
        self.model.repacked_bytes()
    }
    fn prefault(&self, progress: &mut dyn FnMut(u64, u64)) -> usize {
        self.model.prefault(progress)
    }
    fn device(&self) -> String {
        self.model.device()
    }
}
