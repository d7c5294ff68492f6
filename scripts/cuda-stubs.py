#!/usr/bin/env python3
"""Link-only stand-ins for the CUDA libraries that cudarc links (`dynamic-linking`).

CI has no GPU and no driver, so libcuda, libnvrtc, libcurand, libcublas, libcublasLt
and libnccl exist nowhere on it; the linker still wants a shared object that defines
every symbol the binary uses. This writes one `int sym(void){return 1;}` per function
that cudarc's sys bindings declare, and compiles each library with `cc -shared`.

The stubs must never be loaded. Each is written as `libX.so` (what `-lX` looks for)
with the real library's soname (`libcuda.so.1`, ...), so:
  - a binary linked against them records the real name in DT_NEEDED and loads the
    real library on a GPU machine;
  - nothing at run time can find a stub: the loader asks for `libcuda.so.1`, and no
    file of that name is written here.

Usage: cuda-stubs.py CUDARC_SRC_DIR OUT_DIR CUDA_MAJOR
  CUDARC_SRC_DIR  the cudarc crate's root (the folder with Cargo.toml)
  OUT_DIR         where the libX.so files go (put it on LIBRARY_PATH only)
  CUDA_MAJOR      the toolkit's major version; the sonames of nvrtc and cuBLAS follow it
"""

import pathlib
import re
import subprocess
import sys
import tempfile

# cudarc's module folder -> (library name for -l, soname). Sonames whose number does
# not follow the toolkit's major version (the driver API, cuRAND, NCCL) are fixed.
LIBS = {
    "driver": ("cuda", lambda major: "libcuda.so.1"),
    "nvrtc": ("nvrtc", lambda major: f"libnvrtc.so.{major}"),
    "curand": ("curand", lambda major: "libcurand.so.10"),
    "cublas": ("cublas", lambda major: f"libcublas.so.{major}"),
    "cublaslt": ("cublasLt", lambda major: f"libcublasLt.so.{major}"),
    "nccl": ("nccl", lambda major: "libnccl.so.2"),
}

# The symbols the linker needs are the ones inside `extern "C" { ... }` blocks; the
# `pub unsafe fn` wrappers around them also include cudarc's own loader helpers
# (culib, is_culib_present), which no library defines.
EXTERN_BLOCK = re.compile(r'extern\s+"C"\s*\{(.*?)\n\s*\}', re.S)
EXTERN_FN = re.compile(r'(?:#\[link_name\s*=\s*"(\w+)"\]\s*)?(?:pub\s+)?fn\s+(\w+)\s*\(')
PUB_FN = re.compile(r"^\s*pub\s+unsafe\s+fn\s+(\w+)", re.M)
LOADER_HELPERS = {"culib", "is_culib_present", "lib"}


def symbols(sys_dir: pathlib.Path) -> tuple[set[str], set[str]]:
    """(extern symbols, pub unsafe fn names) over every bindings file in sys_dir.

    Bindings are one file with #[cfg(feature = "cuda-XXXXX")] per item in cudarc 0.19,
    and one file per CUDA version in older releases; taking the union over all files
    and all cfgs covers whichever version the build binds to.
    """
    externs: set[str] = set()
    pubs: set[str] = set()
    for path in sorted(sys_dir.rglob("*.rs")):
        text = path.read_text()
        for block in EXTERN_BLOCK.findall(text):
            for link_name, name in EXTERN_FN.findall(block):
                externs.add(link_name or name)
        pubs.update(PUB_FN.findall(text))
    return externs, pubs - LOADER_HELPERS


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    src = pathlib.Path(sys.argv[1]) / "src"
    out = pathlib.Path(sys.argv[2])
    major = int(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)

    for module, (lib, soname_of) in LIBS.items():
        sys_dir = src / module / "sys"
        if not sys_dir.is_dir():
            print(f"cuda-stubs: {sys_dir} not found (cudarc layout changed?)", file=sys.stderr)
            return 1
        externs, pubs = symbols(sys_dir)
        if not externs:
            print(f"cuda-stubs: no extern symbols in {sys_dir}", file=sys.stderr)
            return 1
        # A wrapper without an extern behind it would mean the parse missed a form of
        # declaration, and the link would fail later with a less obvious message.
        missing = pubs - externs
        if missing:
            print(f"cuda-stubs: {lib}: wrappers with no extern found: {sorted(missing)[:10]}",
                  file=sys.stderr)
            return 1
        soname = soname_of(major)
        with tempfile.TemporaryDirectory() as tmp:
            c_file = pathlib.Path(tmp) / f"{lib}.c"
            c_file.write_text("".join(f"int {s}(void){{return 1;}}\n" for s in sorted(externs)))
            subprocess.run(
                ["cc", "-shared", "-fPIC", "-O0", "-w", f"-Wl,-soname,{soname}",
                 "-o", str(out / f"lib{lib}.so"), str(c_file)],
                check=True,
            )
        print(f"cuda-stubs: lib{lib}.so (soname {soname}): {len(externs)} symbols")
    return 0


if __name__ == "__main__":
    sys.exit(main())
