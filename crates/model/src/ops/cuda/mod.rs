//! [`Cuda`]: the operation set on an NVIDIA GPU (feature `cuda`).
//!
//! - Weights: candle-core's GGUF quantized tensors in GPU memory (the file's blocks copied
//!   as they are), multiplied by its CUDA kernels (`QMatMul`: a vector kernel for a few rows,
//!   a tiled one above).
//! - Activations: candle `Tensor`s, f32, contiguous `[rows, cols]`, all on one stream.
//! - Everything else: our kernels (`kernels.cu`, compiled to PTX by `build.rs` and loaded
//!   once per device): RMSNorm, RoPE, the gated FFN, KV writes into the paged pool (f16, as
//!   on the CPU), paged attention (grouped-query, sliding-window, online softmax, reading the
//!   scheduler's block tables), soft-capping and row gathers. They work in place on the
//!   tensors' device memory, so the stream orders them with candle's own kernels.
//! - Collectives: a group with a device path (NCCL) reduces in GPU memory; any other (TCP)
//!   through host copies.
//!
//! Compiled and type-checked on every CI run; run only where a GPU is lent
//! (`scripts/gpu-check.sh`, docs/PERFORMANCE.md says whether it has been).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::quantized::{GgmlDType as CDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Module, Storage, Tensor};
use tpserve_comm::Collective;
use tpserve_gguf::GgmlDType;

use super::{AttnDims, KvMemory, Matrix, Ops};
use crate::config::{Activation, ModelConfig, RopeStyle};
use crate::kv_cache::KvBook;
use crate::model::{ModelError, SeqChunk};
use crate::quant::QMatrix;

/// Our kernels as PTX, for `CUDA_COMPUTE_CAP` (build.rs).
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/tpserve_kernels.ptx"));
/// The module name our kernels are loaded under (once per device).
const MODULE: &str = "tpserve_kernels";
/// Threads per block of the element-wise and row kernels; the attention kernel needs exactly
/// `ATTN_THREADS` (kernels.cu).
const THREADS: u32 = 256;
const ATTN_THREADS: u32 = 128;

/// A CUDA GPU: its candle device (context, stream, kernels) and what it is.
#[derive(Clone)]
pub struct Cuda {
    dev: CudaDevice,
    device: candle_core::Device,
    ordinal: usize,
    name: String,
    uuid: String,
    mem_gib: f64,
}

impl Cuda {
    /// Opens GPU `ordinal`: a context and one stream of its own, which every operation
    /// (candle's and ours) and NCCL use, whichever thread issues them. (`Device::new_cuda`
    /// would give the per-thread default stream: each rayon thread, and NCCL's own worker
    /// thread under a non-blocking communicator, would then run on a different stream, and
    /// nothing would order a collective after the matmul that wrote its buffer.)
    pub fn new(ordinal: usize) -> Result<Self, ModelError> {
        let err = |e: candle_core::Error| ModelError::Device { device: format!("cuda:{ordinal}"), message: e.to_string() };
        let device = candle_core::Device::new_cuda_with_stream(ordinal).map_err(err)?;
        let candle_core::Device::Cuda(dev) = &device else { unreachable!("new_cuda makes a CUDA device") };
        let dev = dev.clone();
        let ctx = dev.cuda_stream().context().clone();
        let derr = |e: candle_core::cuda_backend::cudarc::driver::DriverError| ModelError::Device { device: format!("cuda:{ordinal}"), message: e.to_string() };
        let name = ctx.name().map_err(derr)?;
        let uuid = ctx.uuid().map_err(derr)?.bytes.iter().map(|b| format!("{:02x}", *b as u8)).collect::<String>();
        let mem_gib = ctx.total_mem().map_err(derr)? as f64 / (1u64 << 30) as f64;
        Ok(Self { dev, device, ordinal, name, uuid, mem_gib })
    }

    /// The stream every operation of this device runs on (NCCL must use it too).
    pub fn stream(&self) -> Arc<CudaStream> {
        self.dev.cuda_stream()
    }

    /// The GPU's UUID, hex.
    pub fn gpu_id(&self) -> String {
        self.uuid.clone()
    }

    fn err(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::Device { device: format!("cuda:{}", self.ordinal), message: e.to_string() }
    }

    /// The device address of a contiguous f32 tensor's first element.
    fn ptr(&self, t: &Tensor) -> Result<u64, ModelError> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else { return Err(self.err("a tensor is not in GPU memory")) };
        if !layout.is_contiguous() {
            return Err(self.err("a tensor is not contiguous"));
        }
        let slice = s.as_cuda_slice::<f32>().map_err(|e| self.err(e))?;
        let stream = self.stream();
        let (p, _sync) = slice.device_ptr(&stream);
        Ok(p + (layout.start_offset() * 4) as u64)
    }

    /// The device address of a buffer of ours.
    fn raw<T>(&self, s: &CudaSlice<T>) -> u64
    where
        CudaSlice<T>: DevicePtr<T>,
    {
        let stream = self.stream();
        let (p, _sync) = s.device_ptr(&stream);
        p
    }

    /// Host values as a buffer of ours.
    fn upload_i32(&self, v: &[i32]) -> Result<CudaSlice<i32>, ModelError> {
        // An empty buffer still needs an address.
        let v = if v.is_empty() { &[0][..] } else { v };
        self.stream().clone_htod(v).map_err(|e| self.err(e))
    }

    /// Launches kernel `name` over `grid` blocks of `block` threads with `args` (each a
    /// device address or an i32/f32, in the kernel's order).
    fn launch(&self, name: &str, grid: (u32, u32), block: u32, args: &[Arg]) -> Result<(), ModelError> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        let f = self.dev.get_or_load_custom_func(name, MODULE, PTX).map_err(|e| self.err(e))?;
        let mut b = f.builder();
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: every argument is a device address of a live buffer of this device (its
        // owner outlives the launch on this stream: tensors and buffers are dropped after
        // the pass, and freeing waits for the stream) or a scalar, in the order and types
        // of the kernel's signature in kernels.cu; the sizes passed bound every access.
        unsafe { b.launch(cfg) }.map_err(|e| self.err(format!("kernel {name}: {e}")))?;
        Ok(())
    }

    /// A launch of one thread per element of `n`.
    fn elementwise(&self, name: &str, n: usize, args: &[Arg]) -> Result<(), ModelError> {
        self.launch(name, ((n as u32).div_ceil(THREADS).clamp(0, 65_535), 1), THREADS, args)
    }
}

/// A kernel argument.
enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

fn i32_of(n: usize) -> Arg {
    Arg::I32(i32::try_from(n).expect("sizes of one pass fit in i32"))
}

/// A weight matrix in GPU memory, in its GGUF block encoding.
pub struct CudaMatrix {
    q: QMatMul,
    rows: usize,
    cols: usize,
    nbytes: usize,
}

impl Matrix for CudaMatrix {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn nbytes(&self) -> usize {
        self.nbytes
    }
}

/// candle's name for a GGUF block type.
fn candle_dtype(t: GgmlDType) -> Option<CDType> {
    Some(match t {
        GgmlDType::F32 => CDType::F32,
        GgmlDType::F16 => CDType::F16,
        GgmlDType::BF16 => CDType::BF16,
        GgmlDType::Q4_0 => CDType::Q4_0,
        GgmlDType::Q5_0 => CDType::Q5_0,
        GgmlDType::Q8_0 => CDType::Q8_0,
        GgmlDType::Q4_K => CDType::Q4K,
        GgmlDType::Q5_K => CDType::Q5K,
        GgmlDType::Q6_K => CDType::Q6K,
        _ => return None,
    })
}

/// This rank's KV cache in GPU memory: per layer, keys and values as f16 (`u16` bits),
/// `[rows, kv_dim]` each.
pub struct CudaKv {
    book: KvBook,
    layers: Vec<(CudaSlice<u16>, CudaSlice<u16>)>,
}

impl KvMemory for CudaKv {
    fn book(&self) -> &KvBook {
        &self.book
    }
    fn book_mut(&mut self) -> &mut KvBook {
        &mut self.book
    }
    fn bytes(&self) -> u64 {
        self.layers.iter().map(|(k, v)| ((k.len() + v.len()) * 2) as u64).sum()
    }
}

/// What one forward pass uploads once: per token its position and sequence, and per KV
/// group the sequences' block tables (concatenated, with offsets) and each token's pool row.
pub struct CudaPass {
    pos: CudaSlice<i32>,
    tok_seq: CudaSlice<i32>,
    groups: Vec<GroupPass>,
    rope_dims: usize,
    base_global: f32,
    base_local: f32,
}

struct GroupPass {
    tables: CudaSlice<i32>,
    table_off: CudaSlice<i32>,
    slots: CudaSlice<i32>,
}

impl Ops for Cuda {
    type Act = Tensor;
    type Mat = CudaMatrix;
    type Norm = Tensor;
    type Kv = CudaKv;
    type Pass = CudaPass;

    fn describe(&self) -> String {
        format!("cuda:{} ({}, {:.0} GiB)", self.ordinal, self.name, self.mem_gib)
    }

    fn matrix(&self, m: &QMatrix) -> Result<CudaMatrix, ModelError> {
        let dtype = candle_dtype(m.dtype()).ok_or_else(|| self.err(format!("no CUDA kernel multiplies {}", m.dtype())))?;
        let storage = QStorage::from_data(Cow::Borrowed(m.as_bytes()), &self.device, dtype).map_err(|e| self.err(e))?;
        let q = QTensor::new(storage, (m.rows(), m.cols())).map_err(|e| self.err(e))?;
        Ok(CudaMatrix { q: QMatMul::from_qtensor(q).map_err(|e| self.err(e))?, rows: m.rows(), cols: m.cols(), nbytes: m.nbytes() })
    }

    fn norm_weight(&self, w: Vec<f32>) -> Result<Tensor, ModelError> {
        let n = w.len();
        Tensor::from_vec(w, n, &self.device).map_err(|e| self.err(e))
    }

    fn kv_memory(&self, book: KvBook) -> Result<CudaKv, ModelError> {
        let stream = self.stream();
        let layers = (0..book.n_layers())
            .map(|il| {
                let n = book.rows(il) * book.kv_dim();
                let k = stream.alloc_zeros::<u16>(n.max(1)).map_err(|e| self.err(format!("cannot reserve the KV cache: {e}")))?;
                let v = stream.alloc_zeros::<u16>(n.max(1)).map_err(|e| self.err(format!("cannot reserve the KV cache: {e}")))?;
                Ok((k, v))
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(CudaKv { book, layers })
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<Tensor, ModelError> {
        Tensor::zeros((rows, cols), DType::F32, &self.device).map_err(|e| self.err(e))
    }

    fn upload(&self, x: Vec<f32>, cols: usize) -> Result<Tensor, ModelError> {
        let rows = x.len() / cols.max(1);
        Tensor::from_vec(x, (rows, cols), &self.device).map_err(|e| self.err(e))
    }

    fn download(&self, x: Tensor) -> Result<Vec<f32>, ModelError> {
        x.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| self.err(e))
    }

    fn matmul(&self, w: &CudaMatrix, x: &Tensor, _n: usize, out: &mut Tensor) -> Result<(), ModelError> {
        *out = w.q.forward(x).and_then(|y| y.contiguous()).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn matmul_parts(&self, parts: &[CudaMatrix], x: &Tensor, n: usize, out: &mut Tensor) -> Result<(), ModelError> {
        if let [w] = parts {
            return self.matmul(w, x, n, out);
        }
        let mut products = Vec::with_capacity(parts.len());
        let mut c0 = 0;
        for p in parts {
            let xs = x.narrow(1, c0, p.cols).and_then(|t| t.contiguous()).map_err(|e| self.err(e))?;
            products.push(p.q.forward(&xs).map_err(|e| self.err(e))?);
            c0 += p.cols;
        }
        *out = tree_sum(&products).and_then(|t| t.contiguous()).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn rms_norm(&self, w: &Tensor, dim: usize, eps: f32, x: &Tensor, out: &mut Tensor) -> Result<(), ModelError> {
        let rows = x.elem_count() / dim;
        self.launch(
            "tp_rms_norm",
            (rows as u32, 1),
            THREADS,
            &[Arg::Ptr(self.ptr(x)?), Arg::Ptr(self.ptr(w)?), Arg::Ptr(self.ptr(out)?), i32_of(rows), i32_of(dim), Arg::F32(eps)],
        )
    }

    fn rms_norm_inplace(&self, w: &Tensor, dim: usize, eps: f32, x: &mut Tensor) -> Result<(), ModelError> {
        let rows = x.elem_count() / dim;
        let p = self.ptr(x)?;
        self.launch("tp_rms_norm", (rows as u32, 1), THREADS, &[Arg::Ptr(p), Arg::Ptr(self.ptr(w)?), Arg::Ptr(p), i32_of(rows), i32_of(dim), Arg::F32(eps)])
    }

    fn scale(&self, x: &mut Tensor, s: f32) -> Result<(), ModelError> {
        let n = x.elem_count();
        self.elementwise("tp_scale", n, &[Arg::Ptr(self.ptr(x)?), i32_of(n), Arg::F32(s)])
    }

    fn add(&self, x: &mut Tensor, y: &Tensor) -> Result<(), ModelError> {
        let n = x.elem_count();
        self.elementwise("tp_add", n, &[Arg::Ptr(self.ptr(x)?), Arg::Ptr(self.ptr(y)?), i32_of(n)])
    }

    fn gated(&self, act: Activation, gate: &mut Tensor, up: &Tensor) -> Result<(), ModelError> {
        let n = gate.elem_count();
        let name = match act {
            Activation::GeluTanh => "tp_gelu_gate",
            Activation::Silu => "tp_silu_gate",
        };
        self.elementwise(name, n, &[Arg::Ptr(self.ptr(gate)?), Arg::Ptr(self.ptr(up)?), i32_of(n)])
    }

    fn softcap(&self, x: &mut Tensor, cap: f32) -> Result<(), ModelError> {
        let n = x.elem_count();
        self.elementwise("tp_softcap", n, &[Arg::Ptr(self.ptr(x)?), i32_of(n), Arg::F32(cap)])
    }

    fn gather_rows(&self, x: &Tensor, cols: usize, rows: &[usize]) -> Result<Tensor, ModelError> {
        let out = self.zeros(rows.len(), cols)?;
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let idx = self.upload_i32(&idx)?;
        self.launch(
            "tp_gather_rows",
            (rows.len() as u32, 1),
            THREADS,
            &[Arg::Ptr(self.ptr(x)?), Arg::Ptr(self.raw(&idx)), Arg::Ptr(self.ptr(&out)?), i32_of(rows.len()), i32_of(cols)],
        )?;
        Ok(out)
    }

    fn begin_pass(&self, cfg: &ModelConfig, kv: &CudaKv, batch: &[SeqChunk<'_>]) -> Result<CudaPass, ModelError> {
        let book = kv.book();
        let pos: Vec<i32> = super::positions(batch).into_iter().map(|p| p as i32).collect();
        let tok_seq: Vec<i32> = batch.iter().enumerate().flat_map(|(i, s)| std::iter::repeat_n(i as i32, s.tokens.len())).collect();
        let groups = (0..book.layout().groups.len())
            .map(|g| {
                let mut tables = Vec::new();
                let mut table_off = Vec::with_capacity(batch.len());
                let mut slots = Vec::with_capacity(pos.len());
                for s in batch {
                    let t = s.tables.get(g).map_or(&[][..], |t| t.as_slice());
                    table_off.push(tables.len() as i32);
                    // Blocks a window no longer reads may be NO_BLOCK: -1, never read.
                    tables.extend(t.iter().map(|&b| b as i32));
                    // A group no layer of this stage uses is not checked (its tables may be
                    // short): no slots, and no layer reads them.
                    let used = book.uses_group(g) && !t.is_empty();
                    slots.extend((s.pos..s.pos + s.tokens.len()).map(|p| if used { book.row(t, p) as i32 } else { -1 }));
                }
                Ok(GroupPass { tables: self.upload_i32(&tables)?, table_off: self.upload_i32(&table_off)?, slots: self.upload_i32(&slots)? })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(CudaPass {
            pos: self.upload_i32(&pos)?,
            tok_seq: self.upload_i32(&tok_seq)?,
            groups,
            rope_dims: cfg.rope_dims,
            base_global: cfg.rope_base_global,
            base_local: cfg.rope_base_local,
        })
    }

    fn end_pass(&self) -> Result<(), ModelError> {
        self.stream().synchronize().map_err(|e| self.err(e))
    }

    fn rope(&self, pass: &CudaPass, x: &mut Tensor, head_dim: usize, style: RopeStyle, local: bool) -> Result<(), ModelError> {
        let (n, cols) = x.dims2().map_err(|e| self.err(e))?;
        let base = if local { pass.base_local } else { pass.base_global };
        let neox = matches!(style, RopeStyle::Neox) as i32;
        let heads = cols / head_dim;
        self.elementwise(
            "tp_rope",
            n * heads * (pass.rope_dims / 2),
            &[
                Arg::Ptr(self.ptr(x)?),
                Arg::Ptr(self.raw(&pass.pos)),
                i32_of(n),
                i32_of(heads),
                i32_of(head_dim),
                i32_of(pass.rope_dims),
                Arg::F32(base),
                Arg::I32(neox),
            ],
        )
    }

    fn kv_write(&self, pass: &CudaPass, kv: &mut CudaKv, il: usize, _batch: &[SeqChunk<'_>], k: &Tensor, v: &Tensor) -> Result<(), ModelError> {
        let (n, kv_dim) = k.dims2().map_err(|e| self.err(e))?;
        let g = &pass.groups[kv.book.group(il)];
        let (kc, vc) = &kv.layers[il];
        self.launch(
            "tp_kv_write",
            (n as u32, 1),
            THREADS,
            &[
                Arg::Ptr(self.ptr(k)?),
                Arg::Ptr(self.ptr(v)?),
                Arg::Ptr(self.raw(&g.slots)),
                Arg::Ptr(self.raw(kc)),
                Arg::Ptr(self.raw(vc)),
                i32_of(n),
                i32_of(kv_dim),
            ],
        )
    }

    fn paged_attention(
        &self,
        pass: &CudaPass,
        kv: &CudaKv,
        il: usize,
        _batch: &[SeqChunk<'_>],
        dims: AttnDims,
        q: &Tensor,
        out: &mut Tensor,
    ) -> Result<(), ModelError> {
        let (n, _) = q.dims2().map_err(|e| self.err(e))?;
        let g = &pass.groups[kv.book.group(il)];
        let (kc, vc) = &kv.layers[il];
        let args = [
            Arg::Ptr(self.ptr(q)?),
            Arg::Ptr(self.raw(kc)),
            Arg::Ptr(self.raw(vc)),
            Arg::Ptr(self.ptr(out)?),
            Arg::Ptr(self.raw(&pass.tok_seq)),
            Arg::Ptr(self.raw(&pass.pos)),
            Arg::Ptr(self.raw(&g.tables)),
            Arg::Ptr(self.raw(&g.table_off)),
            i32_of(n),
            i32_of(dims.n_heads),
            i32_of(dims.n_kv_heads),
            i32_of(dims.head_dim),
            i32_of(kv.book.layout().block_size),
            i32_of(dims.window.unwrap_or(0)),
        ];
        self.launch("tp_paged_attention", (n as u32, dims.n_heads as u32), ATTN_THREADS, &args)
    }

    fn all_reduce(&self, x: &mut Tensor, comm: &dyn Collective) -> Result<(), ModelError> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        if let Some(d) = comm.device() {
            return Ok(d.all_reduce_sum_device(self.ptr(x)?, x.elem_count())?);
        }
        // TCP: through host memory.
        let cols = x.dims2().map_err(|e| self.err(e))?.1;
        let mut host = self.download(x.clone())?;
        comm.all_reduce_sum(&mut host)?;
        *x = self.upload(host, cols)?;
        Ok(())
    }

    fn send(&self, x: &Tensor, comm: &dyn Collective, peer: usize) -> Result<(), ModelError> {
        if let Some(d) = comm.device() {
            return Ok(d.send_device(self.ptr(x)?, x.elem_count(), peer)?);
        }
        Ok(comm.send(&self.download(x.clone())?, peer)?)
    }

    fn recv(&self, rows: usize, cols: usize, comm: &dyn Collective, peer: usize) -> Result<Tensor, ModelError> {
        if let Some(d) = comm.device() {
            let x = self.zeros(rows, cols)?;
            d.recv_device(self.ptr(&x)?, rows * cols, peer)?;
            return Ok(x);
        }
        let mut host = vec![0f32; rows * cols];
        comm.recv(&mut host, peer)?;
        self.upload(host, cols)
    }
}

/// `parts` added as a balanced binary tree, as `tpserve_comm::tree_sum` adds host buffers.
fn tree_sum(parts: &[Tensor]) -> candle_core::Result<Tensor> {
    match parts {
        [] => candle_core::bail!("no parts to add"),
        [one] => Ok(one.clone()),
        _ => {
            let (l, r) = parts.split_at(parts.len().div_ceil(2));
            tree_sum(l)?.add(&tree_sum(r)?)
        }
    }
}
