//! The controller's side of the control API.

use guest_agent::abi::{err, reason};

use super::{ControlError, Controller, MAX_DEPTH};
use crate::api::{EntryInfo, Op, Response};
use crate::spec::stack::SpecId;

impl Controller {
    /// Serves a control API request, acting as the VM's owner (rule 8).
    pub(super) fn api(
        &mut self,
        op: Op,
        path: Option<std::path::PathBuf>,
    ) -> Result<Response, ControlError> {
        let code = |e: u64| {
            match e {
            err::NO_SPECULATION => Response::error("the VM holds no speculation of its own"),
            err::TOO_DEEP => Response::error(format!("the checkpoint stack is full ({MAX_DEPTH})")),
            err::NO_BUDGET => Response::error(
                "the checkpoints hold the VM's memory budget (--checkpoint-budget); commit or abort first",
            ),
            e => Response::error(format!("error {}", e as i64)),
        }
        };
        let with_id = |id: SpecId| Response {
            id: Some(id.to_string()),
            ..Response::ok()
        };
        Ok(match op {
            Op::Status => Response {
                depth: Some(self.engine.depth()),
                entries: Some(
                    self.engine
                        .entries()
                        .iter()
                        .map(|e| EntryInfo {
                            id: e.id.to_string(),
                            explicit: e.explicit,
                        })
                        .collect(),
                ),
                paused: Some(self.user_paused),
                vm_id: Some(self.vm_id),
                event_clients: Some(self.publish.as_ref().map_or(0, |p| p.receiver_count())),
                ..Response::ok()
            },
            Op::Pause => {
                self.pause(false)?;
                self.user_paused = true;
                Response::ok()
            }
            Op::Resume => {
                self.user_paused = false;
                self.resume();
                Response::ok()
            }
            Op::Speculate => {
                self.pause(true)?;
                let r = self.speculate(None)?;
                self.resume();
                r.map_or_else(code, with_id)
            }
            Op::Commit => self.commit(None)?.map_or_else(code, with_id),
            Op::Abort => {
                self.pause(false)?;
                let r = self.abort_own(reason::ABORTED_BY_HOST, None)?;
                self.resume();
                r.map_or_else(code, with_id)
            }
            Op::Events => Response::error("events are served by the API server"),
            Op::Snapshot => self.snapshot(path)?,
            Op::DiskExport => Response::error("disk-export is served by Controller::disk_export"),
        })
    }

    /// Serves `disk-export`: takes the disk's committed content here (a
    /// copy of its private level, with the device locked), and writes the
    /// file on a thread of its own, which answers; the VM runs on
    /// meanwhile.
    pub(super) fn disk_export(&mut self, call: crate::api::ApiCall) {
        use crate::devices::virtio::block::export::ExportSource;
        let refuse = |reply: tokio::sync::oneshot::Sender<Response>, why: String| {
            let _ = reply.send(Response::error(format!("disk-export refused: {why}")));
        };
        let Some(path) = call.path else {
            return refuse(call.reply, "it needs --path, the new image file".into());
        };
        let blocks = self.machine.devices.blocks();
        let i = call.disk.unwrap_or(0) as usize;
        let Some(disk) = blocks.get(i) else {
            return refuse(
                call.reply,
                format!("disk {i}: the VM has {} --disk", blocks.len()),
            );
        };
        let source = match ExportSource::take(disk) {
            Ok(s) => s,
            Err(e) => return refuse(call.reply, e.to_string()),
        };
        let reply = call.reply;
        let spawned = std::thread::Builder::new()
            .name("disk-export".into())
            .spawn(move || {
                let r = match source.write(&path) {
                    Ok(n) => Response {
                        bytes: Some(n.bytes),
                        granules: Some(n.granules),
                        ..Response::ok()
                    },
                    Err(e) => Response::error(e.to_string()),
                };
                let _ = reply.send(r);
            });
        if let Err(e) = spawned {
            tracing::warn!("disk-export: no thread: {e}");
        }
    }
}
