//! `spec`: speculation from shell scripts inside a Linux guest.
//!
//! ```sh
//! if spec speculate; then
//!     echo "optimistic path"; spec commit
//! else
//!     echo "rolled back: the pessimistic path"
//! fi
//! ```
//!
//! `spec speculate` exits 0 when the checkpoint is taken, and, after the
//! whole VM (this shell included) is rolled back to it, exits with the
//! abort reason (1 = the guest aborted, 2 = the host did, 3 = the bridge
//! refused the speculation: its registry could not record it). Errors exit 100
//! and up, with a message. Needs root (for `ioperm`).

use std::process::ExitCode;

use guest_agent::hypercall::{self, Error};
use guest_agent::linux;

const USAGE: &str = "usage: spec speculate|commit|abort|status|ready";

fn error_code(e: Error) -> ExitCode {
    eprintln!("spec: {}", describe(e));
    ExitCode::from(match e {
        Error::NoSpeculation => 101,
        Error::TooDeep => 102,
        Error::NoBudget => 103,
        _ => 100,
    })
}

fn describe(e: Error) -> String {
    match e {
        Error::NoSpeculation => "this VM holds no speculation of its own".into(),
        Error::TooDeep => "the checkpoint stack is full".into(),
        Error::BadOp => "the VMM does not know this operation".into(),
        Error::BadArg => "bad argument".into(),
        Error::Internal => "the VMM failed to take or restore a checkpoint".into(),
        Error::NoBudget => {
            "the checkpoints hold as much memory as the VMM allows; commit or abort first".into()
        }
        Error::Unknown(v) => format!("unknown result {}", v as i64),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, cmd] = args.as_slice() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if let Err(e) = linux::open() {
        eprintln!("spec: no access to the hypercall port (run as root): {e}");
        return ExitCode::from(100);
    }
    match cmd.as_str() {
        "speculate" => match hypercall::speculate() {
            Ok(reason) => ExitCode::from(reason.min(99) as u8),
            Err(e) => error_code(e),
        },
        "commit" => match hypercall::commit() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => error_code(e),
        },
        "abort" => error_code(hypercall::abort()),
        // The init script says this once, when the guest is ready for work:
        // a VMM with a boot cache saves the VM here (docs/boot-cache.md).
        "ready" => match hypercall::ready() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => error_code(e),
        },
        "status" => {
            let s = hypercall::status();
            println!("depth {} deps {} own {}", s.depth, s.deps, s.own);
            for i in 0..s.deps {
                if let Ok((id, explicit)) = hypercall::entry(i) {
                    let kind = if explicit { "own" } else { "joined" };
                    println!("{}:{} {kind}", id >> 32, id & 0xffff_ffff);
                }
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
