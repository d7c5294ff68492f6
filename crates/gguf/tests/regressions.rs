//! Inputs found by fuzzing the GGUF parser (`fuzz/`), kept as tests so that the behaviour the
//! fuzz targets rely on cannot silently change. Each test says what its input exercises.

use tpserve_gguf::{GgmlDType, Gguf, GgufError, GgufWriter};

/// `gguf_parse` crash-56acbe85 (the fuzz target's bug, not the parser's): three tensors all
/// named "", the last with 8 dimensions whose first is 0 while the others multiply past u64
/// on their own. The whole product is 0, so the parser rightly accepts it with no bytes; the
/// target computed the row count as the product of the other dimensions and overflowed.
const ZERO_ROW_LENGTH_INPUT: &[u8] = b"GGUF\x03\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00\x00\x00\x00\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00I\x00\x00\x00GGUF\x03\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00\x00\x00\x00\x00\x00I\x00\x00\x00\x00\xba/\xa53\x9f\xa8\xfb\x8e\xac\x00\xba/\xa53\x9f\
      _\x22\xcd-N\x22\xa8\xfb\x86\xac_\x22\xcd-N\x22";

#[test]
fn the_fuzzed_zero_row_length_input_parses_into_one_empty_tensor() {
    let (metadata, tensors) = Gguf::parse_bytes(ZERO_ROW_LENGTH_INPUT).expect("parses");
    assert!(metadata.is_empty());
    // Three directory entries share the name "": the last one wins.
    assert_eq!(tensors.len(), 1);
    let t = &tensors[""];
    assert_eq!(t.dims.len(), 8);
    assert_eq!(t.dims[0], 0);
    assert_eq!(t.dtype, GgmlDType::F32);
    assert_eq!(t.nbytes, 0);
    assert!(t.dims[1..].iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).is_none(), "{:?}", t.dims);
}

#[test]
fn a_zero_length_tensor_with_huge_other_dimensions_is_empty_and_asking_for_a_shape_is_an_error() {
    let mut w = GgufWriter::new();
    w.tensor("z", &[0, 1 << 40, 1 << 40], GgmlDType::Q8_0, Vec::new());
    w.tensor("after", &[32], GgmlDType::F32, vec![0; 128]);
    let bytes = w.to_bytes();
    let (_, tensors) = Gguf::parse_bytes(&bytes).expect("parses");
    assert_eq!(tensors["z"].nbytes, 0);
    assert_eq!(tensors["after"].nbytes, 128);

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &bytes).unwrap();
    let g = Gguf::open(file.path()).unwrap();
    let err = g.tensor_of_shape("z", &[0, 1 << 40]).unwrap_err();
    assert!(matches!(err, GgufError::ShapeMismatch { .. }), "{err}");
    let err = g.tensor_of_shape("z", &[0]).unwrap_err();
    assert!(matches!(err, GgufError::ShapeMismatch { .. }), "{err}");
    // The tensor after it is unaffected.
    let (_, after) = g.tensor_of_shape("after", &[32]).unwrap();
    assert_eq!(after.as_slice(), &[0u8; 128][..]);
}
