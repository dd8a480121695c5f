//! Templates: frozen VMs that clones are made from. A template is the VM's captured state plus
//! its RAM as sealed template memory (see [`crate::memory`] for the memory model).

pub mod persist;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::kvm::Kvm;
use crate::memory::TemplateMemory;
use crate::pagemap::PageMap;
use crate::vm::{Vm, VmError, VmState};

static NEXT_TEMPLATE_ID: AtomicU64 = AtomicU64::new(1);

/// A frozen VM.
pub struct Template {
    id: u64,
    memory: TemplateMemory,
    state: VmState,
}

impl Template {
    /// Freezes `vm` into a template. The VM is paused for the call (the caller holds it): its
    /// state is captured, and its RAM becomes template memory without copying the shared part.
    /// The VM keeps running afterwards, on a private view of that memory.
    pub fn freeze(kvm: &Kvm, vm: &mut Vm) -> Result<Template, VmError> {
        let (memory, state) = vm.freeze(kvm)?;
        Ok(Template::new(memory, state))
    }

    /// [`Template::freeze`] reading the host's page tables through `pagemap` (this process's
    /// `/proc/self/pagemap`, already open; a sandboxed cell cannot open it again).
    pub fn freeze_with(kvm: &Kvm, vm: &mut Vm, pagemap: &PageMap) -> Result<Template, VmError> {
        let (memory, state) = vm.freeze_with(kvm, pagemap)?;
        Ok(Template::new(memory, state))
    }

    /// A template from memory and a state captured with it.
    pub fn new(memory: TemplateMemory, state: VmState) -> Template {
        Template {
            id: NEXT_TEMPLATE_ID.fetch_add(1, Ordering::Relaxed),
            memory,
            state,
        }
    }

    /// Process-unique id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The template's memory.
    pub fn memory(&self) -> &TemplateMemory {
        &self.memory
    }

    /// The captured state clones resume from.
    pub fn state(&self) -> &VmState {
        &self.state
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.memory.size()
    }
}
