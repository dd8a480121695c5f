//! KVM's binary statistics (`KVM_GET_STATS_FD`, KVM API doc 4.133): every counter the VM or vCPU
//! exposes, with names and types taken from the descriptors KVM publishes, not hard-coded.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT, KVM_STATS_TYPE_LINEAR_HIST, KVM_STATS_TYPE_LOG_HIST,
    KVM_STATS_TYPE_MASK, KVM_STATS_TYPE_PEAK, KVM_STATS_UNIT_BOOLEAN, KVM_STATS_UNIT_BYTES, KVM_STATS_UNIT_CYCLES,
    KVM_STATS_UNIT_MASK, KVM_STATS_UNIT_SECONDS,
};
use serde::{Deserialize, Serialize};

mod ioctls {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
}
use ioctls::KVM_GET_STATS_FD;

/// Size of `struct kvm_stats_header`.
const HEADER_SIZE: usize = 24;
/// Size of `struct kvm_stats_desc` before its name.
const DESC_FIXED_SIZE: usize = 16;

/// One statistic's value: a counter, or the buckets of a histogram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum StatValue {
    /// A single number.
    Scalar(u64),
    /// Histogram buckets.
    Histogram(Vec<u64>),
}

impl StatValue {
    /// The number, for scalars.
    pub fn scalar(&self) -> Option<u64> {
        match self {
            StatValue::Scalar(v) => Some(*v),
            StatValue::Histogram(_) => None,
        }
    }
}

/// A statistic as published: its value plus how KVM describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct Stat {
    /// `cumulative`, `instant`, `peak`, `linear_hist` or `log_hist`.
    pub kind: Cow<'static, str>,
    /// `none`, `bytes`, `seconds`, `cycles` or `boolean`.
    pub unit: Cow<'static, str>,
    /// Power-of-ten or power-of-two exponent of the unit.
    pub exponent: i16,
    /// The value.
    pub value: StatValue,
}

/// All statistics of one VM or vCPU, by name.
pub type Stats = BTreeMap<String, Stat>;

struct Descriptor {
    name: String,
    kind: &'static str,
    unit: &'static str,
    exponent: i16,
    size: usize,
    offset: usize,
}

/// An open binary-stats file of a VM or vCPU, with its descriptors parsed.
pub struct StatsFile {
    file: File,
    descriptors: Vec<Descriptor>,
    data_offset: u64,
    data_len: usize,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn kind_name(flags: u32) -> &'static str {
    match flags & KVM_STATS_TYPE_MASK {
        KVM_STATS_TYPE_CUMULATIVE => "cumulative",
        KVM_STATS_TYPE_INSTANT => "instant",
        KVM_STATS_TYPE_PEAK => "peak",
        KVM_STATS_TYPE_LINEAR_HIST => "linear_hist",
        KVM_STATS_TYPE_LOG_HIST => "log_hist",
        _ => "unknown",
    }
}

fn unit_name(flags: u32) -> &'static str {
    match flags & KVM_STATS_UNIT_MASK {
        KVM_STATS_UNIT_BYTES => "bytes",
        KVM_STATS_UNIT_SECONDS => "seconds",
        KVM_STATS_UNIT_CYCLES => "cycles",
        KVM_STATS_UNIT_BOOLEAN => "boolean",
        _ => "none",
    }
}

/// A new binary-stats fd of the VM or vCPU behind `fd` (`KVM_GET_STATS_FD`).
pub fn stats_fd(fd: &impl AsRawFd) -> io::Result<File> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
    let raw = unsafe { vmm_sys_util::ioctl::ioctl(fd, KVM_GET_STATS_FD()) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(raw) })
}

impl StatsFile {
    /// Opens the stats of the VM or vCPU behind `fd` (`KVM_GET_STATS_FD`) and reads its
    /// descriptors.
    pub fn open(fd: &impl AsRawFd) -> io::Result<Self> {
        Self::from_file(stats_fd(fd)?)
    }

    /// Reads the descriptors of a stats fd obtained elsewhere (e.g. passed by the process that
    /// holds the VM); the statistics can then be read without access to the VM.
    pub fn from_file(file: File) -> io::Result<Self> {
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0)?;
        let name_size = u32_at(&header, 4) as usize;
        let num_desc = u32_at(&header, 8) as usize;
        let desc_offset = u64::from(u32_at(&header, 16));
        let data_offset = u64::from(u32_at(&header, 20));
        let desc_size = DESC_FIXED_SIZE + name_size;
        let mut raw_descs = vec![0u8; desc_size * num_desc];
        file.read_exact_at(&mut raw_descs, desc_offset)?;
        let descriptors: Vec<Descriptor> = raw_descs
            .chunks_exact(desc_size)
            .map(|d| {
                let flags = u32_at(d, 0);
                let name = &d[DESC_FIXED_SIZE..];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                Descriptor {
                    name: String::from_utf8_lossy(&name[..end]).into_owned(),
                    kind: kind_name(flags),
                    unit: unit_name(flags),
                    exponent: i16::from_le_bytes([d[4], d[5]]),
                    size: usize::from(u16::from_le_bytes([d[6], d[7]])),
                    offset: u32_at(d, 8) as usize,
                }
            })
            .collect();
        let data_len = descriptors.iter().map(|d| d.offset + d.size * 8).max().unwrap_or(0);
        Ok(StatsFile {
            file,
            descriptors,
            data_offset,
            data_len,
        })
    }

    /// Reads every statistic now.
    pub fn read(&self) -> io::Result<Stats> {
        let mut data = vec![0u8; self.data_len];
        self.file.read_exact_at(&mut data, self.data_offset)?;
        let word = |at: usize| {
            data.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        Ok(self
            .descriptors
            .iter()
            .map(|d| {
                let values: Vec<u64> = (0..d.size).map(|i| word(d.offset + i * 8)).collect();
                let value = match values.as_slice() {
                    [one] if !d.kind.ends_with("hist") => StatValue::Scalar(*one),
                    _ => StatValue::Histogram(values),
                };
                (
                    d.name.clone(),
                    Stat {
                        kind: Cow::Borrowed(d.kind),
                        unit: Cow::Borrowed(d.unit),
                        exponent: d.exponent,
                        value,
                    },
                )
            })
            .collect())
    }
}

/// The statistics of a VM and of each of its vCPUs at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct KvmStats {
    /// VM-wide statistics.
    #[cfg_attr(feature = "schema", schema(value_type = BTreeMap<String, Stat>))]
    pub vm: Stats,
    /// Per-vCPU statistics.
    #[cfg_attr(feature = "schema", schema(value_type = Vec<BTreeMap<String, Stat>>))]
    pub vcpus: Vec<Stats>,
}

impl KvmStats {
    /// How much the scalar `name` grew from `earlier` to `self` (VM stat, or summed over vCPUs
    /// when `vcpu` is true). `None` if KVM does not publish it.
    pub fn delta(&self, earlier: &KvmStats, name: &str, vcpu: bool) -> Option<i64> {
        let sum = |s: &KvmStats| -> Option<u64> {
            if vcpu {
                s.vcpus
                    .iter()
                    .map(|v| v.get(name).and_then(|st| st.value.scalar()))
                    .sum()
            } else {
                s.vm.get(name).and_then(|st| st.value.scalar())
            }
        };
        Some(sum(self)? as i64 - sum(earlier)? as i64)
    }
}
