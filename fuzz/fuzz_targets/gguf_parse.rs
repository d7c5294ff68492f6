//! Fuzzes the GGUF parser: arbitrary bytes must parse or fail with a `GgufError`, never
//! panic, overflow or allocate without bound. When the bytes parse, every tensor the parser
//! accepted must also be accepted by `QMatrix::new` over exactly the bytes the directory
//! points at (the two disagree only when a row is not a whole number of blocks), and its
//! first row must dequantize.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tpserve_gguf::Gguf;
use tpserve_model::quant::{is_supported, QMatrix, QuantError, TensorBytes};

/// Tensors checked per input; the directory may list many tensors over the same bytes, and
/// each check copies them.
const MAX_TENSORS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Ok((metadata, tensors)) = Gguf::parse_bytes(data) else {
        return;
    };
    for v in metadata.values() {
        let _ = (v.type_name(), v.as_u64(), v.as_f64(), v.as_str(), v.as_array().map(<[_]>::len));
    }
    for t in tensors.values().take(MAX_TENSORS) {
        // The parser promises the tensor lies inside the bytes.
        let start = usize::try_from(t.offset).expect("offset inside the input fits usize");
        let len = usize::try_from(t.nbytes).expect("length inside the input fits usize");
        let end = start.checked_add(len).expect("end inside the input fits usize");
        assert!(end <= data.len(), "{t:?} reaches past the {}-byte input", data.len());
        if !is_supported(t.dtype) {
            continue;
        }
        // ggml order: dims[0] is the row length; the rest multiply into rows. The product of
        // all dims fits u64 (the parser checked), but with a zero row length the others can
        // still overflow on their own: such a tensor holds no bytes, so skip it.
        let cols = t.dims.first().copied().unwrap_or(1);
        let rows = t.dims.iter().skip(1).try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let (Some(Ok(rows)), Ok(cols)) = (rows.map(usize::try_from), usize::try_from(cols)) else {
            continue;
        };
        let bytes = TensorBytes::Owned(Arc::new(data[start..end].to_vec()));
        match QMatrix::new(t.dtype, rows, cols, bytes) {
            Ok(m) => {
                if rows > 0 {
                    let mut out = vec![0f32; cols];
                    m.dequantize_row(0, &mut out);
                }
            }
            Err(QuantError::NotBlockMultiple { .. }) => {}
            Err(e) => panic!("the parser accepted {t:?} but QMatrix::new refused it: {e}"),
        }
    }
});
