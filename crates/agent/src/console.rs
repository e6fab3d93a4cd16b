//! The console shipper: about once a second, new serial console bytes of
//! every VM the controller placed here go to the controller with their
//! offset (a host without VMs waits for some, without a timer). The controller keeps what it lacks and ignores what it has, so
//! after an agent restart (offsets start at 0 again) resending is harmless.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use stratus_client::types::VmDesiredState;
use stratus_common::VmId;

use crate::agent::Shared;
use crate::error::chain;

/// How much console is read (and sent) at once.
const CHUNK: usize = 64 * 1024;
/// At most this many chunks per VM per round, so one chatty VM cannot
/// starve the others.
const CHUNKS_PER_ROUND: usize = 16;
const EVERY: Duration = Duration::from_secs(1);

pub(crate) async fn console_loop(shared: Arc<Shared>) {
    // Per VM: the next offset to send.
    let mut offsets: HashMap<VmId, u64> = HashMap::new();
    let mut vms_changed = shared.vms_changed.subscribe();
    loop {
        let (listed, vms): (bool, Vec<VmId>) = {
            let book = shared.book();
            let vms = book
                .last_list
                .iter()
                .map(|s| s.id)
                .filter(|id| {
                    book.desired_vm(*id)
                        .is_some_and(|d| d.desired_state != VmDesiredState::Deleted)
                })
                .collect();
            (!book.last_list.is_empty(), vms)
        };
        offsets.retain(|id, _| vms.contains(id));
        if !listed {
            // Nothing to ship until the driver has VMs: no timer meanwhile.
            if vms_changed.changed().await.is_err() {
                return;
            }
            continue;
        }
        for id in vms {
            let offset = offsets.entry(id).or_insert(0);
            ship(&shared, id, offset).await;
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// Sends what the VM's console has from `offset` on; advances `offset` past
/// what the controller accepted.
async fn ship(shared: &Shared, id: VmId, offset: &mut u64) {
    for _ in 0..CHUNKS_PER_ROUND {
        let chunk = match shared.driver.console_read(id, *offset, CHUNK).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(vm = %id, error = %chain(&e), "cannot read the console");
                return;
            }
        };
        if chunk.data.is_empty() {
            *offset = chunk.next_offset;
            return;
        }
        // Where these bytes start (later than asked if older ones were dropped).
        let start = chunk.next_offset.saturating_sub(chunk.data.len() as u64);
        match shared.api.console_append(id, start, &chunk.data).await {
            Ok(()) => *offset = chunk.next_offset,
            Err(e) => {
                tracing::debug!(vm = %id, error = %chain(&e), "cannot send console output; will resend");
                return;
            }
        }
        if chunk.data.len() < CHUNK {
            return;
        }
    }
}
