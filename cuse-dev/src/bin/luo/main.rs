//! `luo`: the userspace Live Update Orchestrator.
//!
//! `main.rs` holds the command line and sends each subcommand to its file;
//! the work is done by the `luo_cuse_dev` library.

mod bench;
mod kexec;
mod shim_check;
mod status;
mod target;
mod update;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use luo_cuse_dev::control::{self, Request};
use luo_cuse_dev::daemon::{Config, Daemon};
use luo_cuse_dev::tools::{demo, fdstore, oracle, syscall_cost};
use luo_cuse_dev::{client, log, persist};
use target::{with_socket, LimitArgs, Target, LIMITS_HELP};

#[derive(Parser)]
#[command(
    name = "luo",
    version,
    about = "A userspace /dev/liveupdate (Linux Live Update Orchestrator uAPI)"
)]
struct Cli {
    /// The daemon's device: where `luo daemon` serves it, what `luo run` and
    /// the tools open, and, without --state-dir, how the other subcommands
    /// find the daemon [default: /dev/liveupdate].
    #[arg(long, global = true, env = "LUO_DEVICE", value_name = "PATH")]
    device: Option<PathBuf>,
    /// The daemon's state dir (its FUSE mount and control socket)
    /// [default: /run/luo, or the one of the daemon serving --device].
    #[arg(long, global = true, env = "LUO_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the device in the foreground until SIGTERM or SIGINT.
    #[command(after_help = LIMITS_HELP)]
    Daemon {
        /// Serve a real character device through /dev/cuse (the device path
        /// must then be /dev/NAME) instead of a FUSE file bound onto the path.
        #[arg(long)]
        cuse: bool,
        /// Let the members of this group (a name or a number) ask for
        /// `status` on the control socket; everything else stays root's.
        #[arg(long, value_name = "GROUP", value_parser = parse_group)]
        status_group: Option<u32>,
        /// How FUSE requests reach the daemon. `io-uring` takes FUSE over
        /// io_uring when the kernel offers it (module parameter
        /// fuse.enable_uring=1, which the daemon never sets) and /dev/fuse
        /// otherwise. A call on its way to a daemon that is killed or
        /// restarted then fails with ECANCELED (the kernel's io_uring
        /// transport), where /dev/fuse keeps it for the next daemon: hence
        /// the default.
        #[arg(long, value_enum, env = "LUO_FUSE_TRANSPORT", default_value_t = FuseTransport::DevFuse)]
        fuse_transport: FuseTransport,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Run a program (and its descendants) so that ioctls returning fds work.
    Run {
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Show the sessions of the running daemon; fails if no daemon answers.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Live-update: freeze every outgoing session and make it incoming.
    ///
    /// The update is simulated: no kexec, the daemon flips its epoch in place
    /// (a real one is `luo kexec`).
    Update {
        /// Accepted and ignored: a simulated update is the only kind `luo
        /// update` makes.
        #[arg(long)]
        simulate: bool,
    },
    /// End-to-end demo: a VMM keeps guest RAM in a memfd, is live-updated by a
    /// simulated reboot, and verifies every page afterwards (needs root).
    Demo {
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Guest RAM in MiB for a second, hugetlb-backed run (0 to skip);
        /// skipped with a note when not enough huge pages are free.
        #[arg(long, default_value_t = 64)]
        hugetlb_mib: u64,
        /// Extra sessions preserved alongside the VM's, one small memfd each.
        #[arg(long, default_value_t = 0)]
        extra_sessions: usize,
    },
    /// Stop the daemon for good: unmount the device, release every preserved
    /// file, end the keeper. (SIGTERM stops it but keeps everything.)
    Shutdown,
    /// Live-update with a real kexec: load the kernel, have the daemon freeze
    /// and stash every session through kmod-shim, then reboot into it. If
    /// anything fails before the reboot, everything is unfrozen and nothing
    /// changed.
    Kexec {
        /// The kernel image to boot (required unless --abort).
        #[arg(long, required_unless_present = "abort", value_name = "IMAGE")]
        kernel: Option<PathBuf>,
        /// Its initramfs.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Its command line.
        #[arg(long, conflicts_with = "reuse_cmdline")]
        cmdline: Option<String>,
        /// Boot it with this kernel's command line.
        #[arg(long)]
        reuse_cmdline: bool,
        /// Appended to the command line.
        #[arg(long)]
        append: Option<String>,
        /// Instead: call off a kexec that was prepared but never happened
        /// (unfreeze, withdraw the stashes, thaw).
        #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline", "reuse_cmdline", "append"])]
        abort: bool,
    },
    /// Replay the differential corpus against a device and print what each
    /// step observed (compare two runs line by line).
    ///
    /// --device is the kernel's or ours (ours needs `luo run`).
    Oracle {
        /// 1: outgoing sessions (leaves sessions for phase 2); 2: after an update.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        phase: u8,
        /// Label printed on every line.
        #[arg(long, default_value = "device")]
        label: String,
    },
    /// Drive QEMU's edu device through its VFIO cdev and an iommufd: DMA
    /// into and out of a memfd, checked byte for byte; stage 1 preserves it
    /// all in a session, stage 2 retrieves it after an update.
    #[command(hide = true)]
    VfioCheck {
        /// 0: the device alone; 1: set up and preserve; 2: retrieve.
        #[arg(long, default_value_t = 0)]
        stage: u32,
        /// The device's VFIO cdev.
        #[arg(long, default_value = "/dev/vfio/devices/vfio0")]
        vfio: PathBuf,
        /// A second device's cdev (stages 1 and 2).
        #[arg(long, default_value = "/dev/vfio/devices/vfio1")]
        spare: PathBuf,
        /// The iommufd device.
        #[arg(long, default_value = "/dev/iommu")]
        iommu: PathBuf,
        /// Guest RAM to map, in MiB.
        #[arg(long, default_value_t = 64)]
        ram_mib: u64,
        /// The stages straddle a real kexec (`luo kexec`), not a simulated
        /// update.
        #[arg(long)]
        kexec: bool,
        /// Stage 2: the spare was removed before the daemon started.
        #[arg(long)]
        spare_removed: bool,
    },
    /// Exercise kmod-shim across a real kexec: stage 1 stashes a shmem and a
    /// hugetlb memfd written with a pattern, stage 2 checks they came back.
    #[command(hide = true)]
    ShimCheck {
        /// kmod-shim's device.
        #[arg(long, default_value = luo_kexec_helper::shim::DEVICE)]
        shim: PathBuf,
        #[arg(long)]
        stage: u32,
        #[arg(long, default_value_t = 256)]
        shmem_mib: u64,
        #[arg(long, default_value_t = 64)]
        hugetlb_mib: u64,
        /// Instead: time stash (stage 1) and restore (stage 2) of one shmem
        /// memfd per size, printed as a `luo bench` stage report.
        #[arg(long, value_delimiter = ',')]
        bench_sizes_kib: Option<Vec<u64>>,
        /// With --bench-sizes-kib: also one hugetlb memfd of this size.
        #[arg(long, default_value_t = 0)]
        bench_hugetlb_mib: u64,
    },
    /// Leave a session whose memfd has a page spliced into a pipe (it cannot
    /// be pinned where it must migrate), held by a detached child.
    #[command(hide = true)]
    HoldSpliced {
        #[arg(long)]
        name: String,
    },
    /// Leave a session whose memfd was resized after preserve (its freeze
    /// fails), held by a detached child.
    #[command(hide = true)]
    HoldResized {
        #[arg(long)]
        name: String,
        /// A hugetlb memfd (2 MiB pages) instead of shmem.
        #[arg(long)]
        hugetlb: bool,
    },
    /// The fd keeper (started by the daemon).
    #[command(hide = true)]
    Keeper {
        #[arg(long)]
        socket: PathBuf,
    },
    /// A session-file opener (started by the daemon when one exited; its
    /// socket is fd 3).
    #[command(hide = true)]
    Opener {
        #[arg(long)]
        fs: PathBuf,
        #[arg(long)]
        first_slot: u64,
    },
    /// One stage of the demo's VMM (started by `luo demo` under `luo run`).
    #[command(hide = true)]
    DemoVmm {
        #[arg(long)]
        stage: u32,
        #[arg(long)]
        size_mib: u64,
        #[arg(long)]
        extra_sessions: usize,
        #[arg(long, value_enum)]
        backing: demo::Backing,
        /// Stage 1: wait for the update with guest RAM mapped, as a VMM
        /// would, instead of leaving the sessions to a child and exiting.
        #[arg(long)]
        wait_for_update: bool,
    },
    /// Measure per-call ioctl latency on a device, ours or the kernel's (on
    /// ours it starts its own `luo run` workers and a simulated update).
    ///
    /// --device is the one to measure: ours or the kernel's.
    Bench {
        /// Calls per ioctl.
        #[arg(long, default_value_t = 2000)]
        calls: usize,
        /// Sizes of the memfds preserved and retrieved one at a time, in KiB.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "4,1024,65536,262144,1048576"
        )]
        sizes_kib: Vec<u64>,
        /// Sessions of the many-sessions total.
        #[arg(long, default_value_t = 2000)]
        sessions: usize,
        /// Files of the many-files total.
        #[arg(long, default_value_t = 500)]
        files: usize,
        /// Print the rows as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only one side, for a real kexec in between: 1 preserves and leaves
        /// the sessions held by a child, 2 retrieves them (with --session).
        #[arg(long)]
        stage: Option<u32>,
        /// Name prefix of the sessions (stage 2: the one stage 1 used).
        #[arg(long)]
        session: Option<String>,
        /// Instead of measuring: print the side-by-side table of the
        /// `BENCH LABEL JSON` lines in this file (a guest's console).
        #[arg(long, conflicts_with_all = ["stage", "json"])]
        compare: Option<PathBuf>,
        /// Instead: what `luo run` costs calls that are not the device's
        /// (fstat, fstatfs, statfs, readlink), timed outside and under `luo
        /// run` on the daemon's device.
        #[arg(long, conflicts_with_all = ["stage", "json", "compare"])]
        syscalls: bool,
        /// Instead: the per-call rows with this many sessions held, for
        /// each count in turn (increasing, e.g. 10,1000,10000), and
        /// PRESERVE_FD into a session of 2000 files.
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["stage", "compare", "syscalls"])]
        scale: Vec<usize>,
        /// Also write SVG charts of the run into this directory
        /// (ioctls.svg; scale.svg with --scale).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["stage", "syscalls"])]
        svg: Option<PathBuf>,
        /// The measuring side of --scale, under `luo run`.
        #[arg(long, value_delimiter = ',', hide = true)]
        scale_stage: Vec<usize>,
    },
    /// Play systemd 262's fd store across an update, for programs that keep
    /// fds in it (systemd's `test-luo`) where systemd is not PID 1: `hold`
    /// before the update, `restore` after it; both under `luo run`.
    Fdstore {
        #[command(subcommand)]
        action: FdstoreAction,
    },
    /// Time fstat, fstatfs, statfs and readlink here; print JSON (used by
    /// `luo bench --syscalls`).
    #[command(hide = true)]
    SyscallCost {
        #[arg(long, default_value_t = 2000)]
        calls: usize,
    },
}

/// `luo daemon --fuse-transport`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FuseTransport {
    DevFuse,
    IoUring,
}

#[derive(Subcommand)]
enum FdstoreAction {
    /// Run the program with a NOTIFY_SOCKET that keeps what it stores
    /// (FDSTORE=1), then do systemd-shutdown's step before a kexec: preserve
    /// the store in LUO session "systemd" and hold it until the update.
    Hold {
        /// The unit the program runs as (the mapping's key).
        #[arg(long, default_value = "test-luo.service")]
        unit: String,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Do PID 1's step after the update: retrieve session "systemd" and
    /// the sessions it names, finish it, and execute the program with the
    /// unit's fds (LISTEN_FDS, LISTEN_FDNAMES).
    Restore {
        /// The unit whose fds the program gets.
        #[arg(long, default_value = "test-luo.service")]
        unit: String,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    // Like other command-line tools, end quietly when the reader of our output
    // goes away (`luo status | head`).
    luo_cuse_dev::sys::default_sigpipe();
    log::set_debug(std::env::var_os("LUO_DEBUG").is_some_and(|v| v != "0"));
    let cli = Cli::parse();
    let target = Target {
        device: cli.device,
        state_dir: cli.state_dir,
    };
    let device = target.device();
    match cli.command {
        Command::Daemon {
            cuse,
            status_group,
            fuse_transport,
            limits,
        } => match Daemon::run(Config {
            device,
            state_dir: target.state_dir(),
            cuse,
            status_group,
            fuse_uring: fuse_transport == FuseTransport::IoUring,
            limits: limits.limits(),
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Run { command } => run(&device, &command),
        Command::Status { json } => with_socket(&target, |s| status::status(s, json)),
        Command::Update { simulate: _ } => with_socket(&target, update::update),
        Command::Shutdown => with_socket(&target, update::shutdown),
        Command::Keeper { socket } => match persist::keeper::serve(&socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Opener { fs, first_slot } => persist::opener::serve_fd3(fs, first_slot),
        Command::Demo {
            size_mib,
            hugetlb_mib,
            extra_sessions,
        } => {
            let opts = demo::Options {
                size_mib: size_mib.max(1),
                hugetlb_mib,
                extra_sessions,
            };
            match demo::run(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Kexec { abort: true, .. } => with_socket(&target, kexec::abort),
        Command::Kexec {
            kernel,
            initrd,
            cmdline,
            reuse_cmdline,
            append,
            ..
        } => with_socket(&target, |socket| {
            kexec::kexec(
                kernel.clone().unwrap_or_default(),
                initrd.clone(),
                cmdline.clone(),
                reuse_cmdline,
                append.clone(),
                socket,
            )
        }),
        Command::HoldSpliced { name } => match oracle::hold_spliced(&device, &name) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("luo hold-spliced: {e}");
                ExitCode::FAILURE
            }
        },
        Command::HoldResized { name, hugetlb } => {
            match oracle::hold_resized(&device, &name, hugetlb) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("luo hold-resized: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::VfioCheck {
            stage,
            vfio,
            spare,
            iommu,
            ram_mib,
            kexec,
            spare_removed,
        } => match luo_cuse_dev::tools::vfio_check::run(
            &luo_cuse_dev::tools::vfio_check::Paths {
                kexec,
                spare_removed,
                device: &vfio,
                spare: &spare,
                iommu: &iommu,
                liveupdate: &device,
            },
            stage,
            ram_mib,
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("luo vfio-check: {e}");
                ExitCode::FAILURE
            }
        },
        Command::ShimCheck {
            shim,
            stage,
            bench_sizes_kib: Some(sizes),
            bench_hugetlb_mib,
            ..
        } => shim_check::bench(&shim, stage, &sizes, bench_hugetlb_mib),
        Command::ShimCheck {
            shim,
            stage,
            shmem_mib,
            hugetlb_mib,
            bench_sizes_kib: None,
            ..
        } => shim_check::check(&shim, stage, shmem_mib, hugetlb_mib),
        Command::Oracle { phase, label } => match oracle::run(&device, phase, &label) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("luo oracle: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Fdstore { action } => {
            let done = match action {
                FdstoreAction::Hold { unit, command } => fdstore::hold(&device, &unit, &command),
                FdstoreAction::Restore { unit, command } => {
                    fdstore::restore(&device, &unit, &command)
                }
            };
            match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("luo fdstore: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::SyscallCost { calls } => match syscall_cost::measure(calls.max(1)) {
            Ok(rows) => print_json(&rows),
            Err(e) => fail(&e),
        },
        Command::DemoVmm {
            stage,
            size_mib,
            extra_sessions,
            backing,
            wait_for_update,
        } => match demo::vmm(
            &device,
            (stage, wait_for_update),
            backing,
            size_mib,
            extra_sessions,
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Bench {
            calls,
            sizes_kib,
            sessions,
            files,
            json,
            stage,
            session,
            compare,
            syscalls,
            scale,
            scale_stage,
            svg,
        } => {
            if let Some(log) = compare {
                return bench::compare(&log, svg.as_deref());
            }
            if !scale.is_empty() || !scale_stage.is_empty() {
                let out = (json, svg.as_deref());
                return bench::scale(&device, (&scale, &scale_stage), calls.max(1), out);
            }
            if syscalls {
                return match syscall_cost::compare(&device, calls.max(1)) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(&e),
                };
            }
            let plan = luo_cuse_dev::tools::bench::Plan {
                calls: calls.max(1),
                sizes_kib,
                sessions,
                files,
            };
            bench::bench(&device, &plan, (json, svg.as_deref()), stage, session)
        }
    }
}

/// `luo run`: the program's exit status; like a shell, 127 when the program
/// is not found and 126 when it cannot be executed.
fn run(device: &Path, command: &[String]) -> ExitCode {
    match client::run::run(device, command) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(client::run::RunError::Spawn { program, source }) => {
            eprintln!("luo run: {program}: {source}");
            match source.raw_os_error() {
                Some(libc::ENOENT) => ExitCode::from(127),
                _ => ExitCode::from(126),
            }
        }
        Err(e) => fail(&e),
    }
}

pub fn print_json(value: &impl serde::Serialize) -> ExitCode {
    println!(
        "{}",
        serde_json::to_string(value).expect("the report serializes")
    );
    ExitCode::SUCCESS
}

pub fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("luo: {}", log::error_chain(e));
    ExitCode::FAILURE
}

pub fn ask(socket: &Path, req: &Request) -> Result<control::Response, ExitCode> {
    control::call(socket, req, None).map_err(|e| {
        eprintln!("luo: no daemon answers at {}: {e}", socket.display());
        ExitCode::FAILURE
    })
}

/// A group by name or number.
fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    luo_cuse_dev::sys::group_id(text)
}
