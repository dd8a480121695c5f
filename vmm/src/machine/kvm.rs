//! The KVM device: opening it, checking the capabilities cowvm relies on, and the per-host facts
//! (supported CPUID, saveable MSRs) that every VM on it shares.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, VmFd};

/// Default path of the KVM device.
pub const KVM_PATH: &str = "/dev/kvm";

/// Size in bytes of the legacy `kvm_xsave` area that `KVM_GET_XSAVE` returns.
const LEGACY_XSAVE_SIZE: i32 = 4096;

/// CPUID leaf 0x8000_0001 EDX bit that advertises 1 GiB pages.
const CPUID_EXT_FEATURES: u32 = 0x8000_0001;
const CPUID_EDX_PDPE1GB: u32 = 1 << 26;

/// A KVM ioctl that failed, with its name: the one shape every module's `Ioctl` variant wraps.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed: {source}")]
pub struct IoctlError {
    /// Name of the ioctl.
    pub op: &'static str,
    /// The error KVM returned.
    #[source]
    pub source: kvm_ioctls::Error,
}

impl IoctlError {
    /// The errno KVM returned.
    pub fn errno(&self) -> i32 {
        self.source.errno()
    }
}

/// Errors from opening KVM or querying it.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device could not be opened.
    #[error("cannot open {path}: {source} (is a KVM module loaded, and may this user open it?)")]
    Open {
        /// Path that was opened.
        path: PathBuf,
        /// The error from `open(2)`.
        source: std::io::Error,
    },
    /// The file answered `KVM_GET_API_VERSION` with something other than 12 (or not at all).
    #[error("{path} is not a usable KVM device: KVM_GET_API_VERSION returned {found}, cowvm needs {KVM_API_VERSION}")]
    ApiVersion {
        /// Path that was opened.
        path: PathBuf,
        /// What the device returned (negative: the ioctl failed).
        found: i32,
    },
    /// A capability cowvm needs is not offered by this KVM.
    #[error("this KVM lacks KVM_CAP_{name}, which cowvm needs for {needed_for}")]
    MissingCapability {
        /// Capability name without the `KVM_CAP_` prefix.
        name: &'static str,
        /// What cowvm uses it for.
        needed_for: &'static str,
    },
    /// The host's xsave area is larger than `KVM_GET_XSAVE` can return (e.g. AMX state).
    #[error("this host's xsave area is {0} bytes, more than the 4096 bytes cowvm captures")]
    XsaveTooLarge(i32),
    /// An ioctl on the KVM device failed.
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
}

impl KvmError {
    /// The OS error number behind the failure, when the host refused something.
    pub fn host_errno(&self) -> Option<i32> {
        match self {
            KvmError::Ioctl(ioctl) => Some(ioctl.errno()),
            _ => None,
        }
    }
}

/// A KVM capability, with the reason cowvm needs it (used in error messages).
#[derive(Debug, Clone, Copy)]
pub struct Capability {
    /// The capability.
    pub cap: Cap,
    /// Its name without the `KVM_CAP_` prefix.
    pub name: &'static str,
    /// What cowvm uses it for.
    pub needed_for: &'static str,
}

/// Capabilities every cowvm VM needs; [`Kvm::open`] checks all of them.
pub const REQUIRED_CAPABILITIES: &[Capability] = &[
    Capability {
        cap: Cap::UserMemory,
        name: "USER_MEMORY",
        needed_for: "guest RAM in host memory",
    },
    Capability {
        cap: Cap::ExtCpuid,
        name: "EXT_CPUID",
        needed_for: "KVM_SET_CPUID2",
    },
    Capability {
        cap: Cap::ImmediateExit,
        name: "IMMEDIATE_EXIT",
        needed_for: "completing I/O before state capture",
    },
    Capability {
        cap: Cap::MpState,
        name: "MP_STATE",
        needed_for: "vCPU state capture",
    },
    Capability {
        cap: Cap::VcpuEvents,
        name: "VCPU_EVENTS",
        needed_for: "vCPU state capture",
    },
    Capability {
        cap: Cap::Debugregs,
        name: "DEBUGREGS",
        needed_for: "vCPU state capture",
    },
    Capability {
        cap: Cap::Xsave,
        name: "XSAVE",
        needed_for: "FPU/SSE/AVX state capture",
    },
    Capability {
        cap: Cap::Xcrs,
        name: "XCRS",
        needed_for: "XCR0 capture",
    },
    Capability {
        cap: Cap::AdjustClock,
        name: "ADJUST_CLOCK",
        needed_for: "KVM clock capture",
    },
];

/// SMM, which cowvm does not use and this host lacks; handy to demonstrate the missing-capability error.
pub const SMM_CAPABILITY: Capability = Capability {
    cap: Cap::X86Smm,
    name: "X86_SMM",
    needed_for: "system management mode",
};

/// An open KVM device plus the facts about it that all VMs share.
pub struct Kvm {
    sys: kvm_ioctls::Kvm,
    supported_cpuid: CpuId,
    saveable_msrs: OnceLock<Vec<u32>>,
}

impl Kvm {
    /// Opens `/dev/kvm` and checks every capability in [`REQUIRED_CAPABILITIES`].
    pub fn open() -> Result<Self, KvmError> {
        Self::open_path(Path::new(KVM_PATH))
    }

    /// Opens the KVM device at `path` and checks it like [`Kvm::open`].
    pub fn open_path(path: &Path) -> Result<Self, KvmError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| KvmError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::from_file(file, path)
    }

    /// Adopts an open KVM device file (e.g. one received from another process) and checks it
    /// like [`Kvm::open`]; `path` names it in errors.
    pub fn from_file(file: File, path: &Path) -> Result<Self, KvmError> {
        // SAFETY: `into_raw_fd` hands over an open fd that nothing else owns; `kvm_ioctls::Kvm`
        // takes ownership and closes it. If the file is not a KVM device, the API version check
        // below fails before any other ioctl is issued on it.
        let sys = unsafe { kvm_ioctls::Kvm::from_raw_fd(file.into_raw_fd()) };
        let found = sys.get_api_version();
        if found != KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion {
                path: path.to_owned(),
                found,
            });
        }
        let kvm = Kvm {
            supported_cpuid: sys.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|source| {
                KvmError::Ioctl(IoctlError {
                    op: "KVM_GET_SUPPORTED_CPUID",
                    source,
                })
            })?,
            sys,
            saveable_msrs: OnceLock::new(),
        };
        for capability in REQUIRED_CAPABILITIES {
            kvm.require(*capability)?;
        }
        let xsave_size = kvm.sys.check_extension_int(Cap::Xsave2);
        if xsave_size > LEGACY_XSAVE_SIZE {
            return Err(KvmError::XsaveTooLarge(xsave_size));
        }
        Ok(kvm)
    }

    /// Fails with a clear [`KvmError::MissingCapability`] if `capability` is absent.
    pub fn require(&self, capability: Capability) -> Result<(), KvmError> {
        if self.sys.check_extension(capability.cap) {
            Ok(())
        } else {
            Err(KvmError::MissingCapability {
                name: capability.name,
                needed_for: capability.needed_for,
            })
        }
    }

    /// Whether KVM offers `cap`.
    pub fn has(&self, cap: Cap) -> bool {
        self.sys.check_extension(cap)
    }

    /// The CPUID entries KVM supports (`KVM_GET_SUPPORTED_CPUID`), given to every vCPU.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Whether the vCPUs may use 1 GiB pages (CPUID 0x8000_0001 EDX.pdpe1gb).
    pub fn supports_1gib_pages(&self) -> bool {
        self.supported_cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == CPUID_EXT_FEATURES && e.edx & CPUID_EDX_PDPE1GB != 0)
    }

    /// Creates a new, empty VM (`KVM_CREATE_VM`).
    pub fn create_vm(&self) -> Result<VmFd, KvmError> {
        self.sys.create_vm().map_err(|source| {
            KvmError::Ioctl(IoctlError {
                op: "KVM_CREATE_VM",
                source,
            })
        })
    }

    /// The MSRs from `KVM_GET_MSR_INDEX_LIST` that a vCPU on this host can both read and write
    /// back. Probed once per process on a throw-away VM, since some listed MSRs cannot be set.
    pub fn saveable_msrs(&self) -> Result<&[u32], KvmError> {
        if let Some(list) = self.saveable_msrs.get() {
            return Ok(list);
        }
        let list = self.probe_saveable_msrs()?;
        Ok(self.saveable_msrs.get_or_init(|| list))
    }

    fn probe_saveable_msrs(&self) -> Result<Vec<u32>, KvmError> {
        let ioctl = |op| move |source| KvmError::Ioctl(IoctlError { op, source });
        let index_list = self.sys.get_msr_index_list().map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let vm = self.create_vm()?;
        let vcpu = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&self.supported_cpuid)
            .map_err(ioctl("KVM_SET_CPUID2"))?;
        let mut saveable = Vec::new();
        for &index in index_list.as_slice() {
            let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }]) else {
                continue;
            };
            if vcpu.get_msrs(&mut msrs).ok() == Some(1) && vcpu.set_msrs(&msrs).ok() == Some(1) {
                saveable.push(index);
            }
        }
        Ok(saveable)
    }
}
