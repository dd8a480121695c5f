//! Deleting an in-cell clone by recycling it: while its template's warm shells in cells are
//! short of what is wanted, the clone's cell resets it into a warm shell off the request path
//! (instead of tearing it down and building a new shell), and its room under `--max-vms` becomes
//! the shell's.

use super::{lock, CellService, CellVm};
use cowvm_cell::protocol::TemplateId;
use cowvm_cell::PoolError;

impl CellService {
    /// Whether the cells keep fewer warm shells of `template` than are wanted.
    pub(super) fn short_of(&self, template: TemplateId) -> bool {
        let wanted = self.lock_warm().wanted.get(&template).copied().unwrap_or(0);
        self.pool.warm_target(template) < wanted
    }

    /// Deletes `vm`, a clone of `template`, by recycling it in its cell; true if it became a
    /// warm shell (its room moves to the template's shells), false if the cell destroyed it.
    ///
    /// No lock is held across the round trip (the cell may be busy running another VM's guest,
    /// and clone calls would wait behind it). Should the warm keeper match room to targets
    /// between the target rising and the room moving, it admits room for the new shell itself,
    /// or lowers the target when `--max-vms` is reached; the room moved here is then surplus,
    /// which its next round gives back.
    pub(super) fn recycle(&self, vm: &CellVm, template: TemplateId) -> Result<bool, PoolError> {
        let recycled = self.pool.recycle(vm.at)?;
        if recycled {
            let target = self.pool.warm_target(template);
            let mut state = self.lock_warm();
            if let Some(room) = lock(&vm.slot).take() {
                state.room.entry(template).or_default().push(room);
            }
            let short = state.wanted.get(&template).copied().unwrap_or(0).saturating_sub(target);
            let floor = state.floor.entry(template).or_insert(short);
            *floor = (*floor).min(short);
        }
        Ok(recycled)
    }
}
