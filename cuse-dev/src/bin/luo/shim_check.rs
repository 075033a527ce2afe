//! `luo shim-check`: a known pattern across a real kexec, or (with
//! `--bench-sizes-kib`) the kexec rows of `luo bench`.

use std::path::Path;
use std::process::ExitCode;

use luo_cuse_dev::tools::shim_check::{bench, check as pattern};
use luo_kexec_helper::shim::Shim;

use crate::print_json;

/// The pattern check, stage 1 (write and stash) or 2 (restore and compare).
pub fn check(device: &Path, stage: u32, shmem_mib: u64, hugetlb_mib: u64) -> ExitCode {
    match pattern::run(device, stage, shmem_mib, hugetlb_mib) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luo shim-check: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The kexec rows of the benchmark.
pub fn bench(device: &Path, stage: u32, sizes: &[u64], hugetlb_mib: u64) -> ExitCode {
    let report = Shim::open(device)
        .map_err(|e| format!("open {}: {e}", device.display()))
        .and_then(|shim| match stage {
            1 => bench::stage1(&shim, sizes, hugetlb_mib),
            _ => bench::stage2(&shim),
        });
    match report {
        Ok(r) => print_json(&r),
        Err(e) => {
            eprintln!("luo shim-check: {e}");
            ExitCode::FAILURE
        }
    }
}
