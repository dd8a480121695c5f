//! Portable templates: a template as an OCI image layout in a tar archive, which registries store
//! and `skopeo`/`oras` copy.
//!
//! The archive holds `oci-layout`, `index.json` (one manifest) and `blobs/sha256/<hex>`. The
//! manifest's `artifactType` is [`ARTIFACT_TYPE`]; its config is the state blob
//! ([`STATE_MEDIA_TYPE`]: format version, RAM size, populated bytes and the captured VM state as
//! JSON) and its layers are memory chunks ([`CHUNK_MEDIA_TYPE`]): each is the zstd-compressed
//! concatenation of the guest byte ranges listed in its [`RUNS_ANNOTATION`] annotation. Only
//! populated ranges are stored, so an archive is about the size of the template's data, not its
//! RAM.
//!
//! A layered template (frozen from a clone) is exported **flattened**: its chunks hold the
//! content of every layer, later layers winning, and it imports as one flat template. Parent
//! chains would need the parent on the receiving host first and buy little over a registry that
//! deduplicates identical blobs anyway.
//!
//! Import reads an archive from a file, verifies the sha256 of every blob it uses, the state's
//! format version and every range, and builds a sealed memfd; nothing is kept unless all of it
//! checks out.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;

use cowvm_vmm::boot::layout::{MAX_MEMORY, MIN_MEMORY};
use cowvm_vmm::memory::{FrozenMemory, MemoryError, TemplateMemory, PAGE_SIZE};
use cowvm_vmm::{Template, VmState};
use oci_spec::image::{
    Descriptor, DescriptorBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder, MediaType,
    OciLayoutBuilder, SCHEMA_VERSION,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's `artifactType`.
pub const ARTIFACT_TYPE: &str = "application/vnd.cowvm.template.v1";
/// Media type of the state blob (the manifest's config).
pub const STATE_MEDIA_TYPE: &str = "application/vnd.cowvm.template.state.v1+json";
/// Media type of a memory chunk.
pub const CHUNK_MEDIA_TYPE: &str = "application/vnd.cowvm.template.memory.v1.chunk+zstd";
/// Chunk annotation: the guest byte ranges `[[start, end], ...]` the chunk's bytes fill, in order.
pub const RUNS_ANNOTATION: &str = "dev.cowvm.template.runs";
/// The state blob's format version this cowvm writes and reads.
pub const STATE_VERSION: u32 = 1;
/// Uncompressed bytes per chunk at most.
pub const CHUNK_BYTES: u64 = 8 << 20;
/// zstd level of the chunks (fast; guest RAM is mostly zeros and code).
const ZSTD_LEVEL: i32 = 3;
/// Largest `index.json`, manifest or state blob read.
const MAX_JSON: u64 = 16 << 20;
/// Most tar entries an archive may have.
const MAX_ENTRIES: usize = 1 << 20;

/// Why an archive could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading the template or writing the archive failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The archive is not a well-formed OCI layout tar (truncated, missing or oversized parts).
    #[error("malformed archive: {0}")]
    Malformed(String),
    /// A blob's content does not match its digest or size.
    #[error("blob {digest}: {why}")]
    Digest {
        /// The digest named by the manifest.
        digest: String,
        /// What does not match.
        why: String,
    },
    /// The archive is well formed but not a cowvm template this cowvm reads.
    #[error("unsupported archive: {0}")]
    Unsupported(String),
    /// The template it holds is not valid (state or ranges).
    #[error("invalid template: {0}")]
    Invalid(String),
    /// The template has more RAM than this server allows.
    #[error("the template has {size} bytes of RAM; this server allows at most {max_memory}")]
    TooLarge {
        /// Its RAM size.
        size: u64,
        /// The limit.
        max_memory: u64,
    },
    /// Building the template memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ArchiveError {
    move |source| ArchiveError::Io { what, source }
}

fn malformed(reason: impl Into<String>) -> ArchiveError {
    ArchiveError::Malformed(reason.into())
}

/// The state blob.
#[derive(Serialize, Deserialize)]
struct StateBlob<S> {
    /// [`STATE_VERSION`].
    version: u32,
    /// RAM size in bytes.
    memory_size: u64,
    /// Bytes stored in the chunks (the sum of their runs).
    populated_bytes: u64,
    /// The captured VM state.
    state: S,
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportSummary {
    /// Memory chunks (layers).
    pub chunks: usize,
    /// Guest bytes stored (uncompressed).
    pub populated_bytes: u64,
    /// Compressed bytes of the chunks.
    pub compressed_bytes: u64,
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn descriptor(media_type: &str, bytes: &[u8], annotations: Option<HashMap<String, String>>) -> Descriptor {
    let digest = format!("sha256:{}", sha256_hex(bytes));
    let mut builder = DescriptorBuilder::default()
        .media_type(MediaType::Other(media_type.to_owned()))
        .size(bytes.len() as u64)
        .digest(
            digest
                .parse::<oci_spec::image::Digest>()
                .expect("a sha256 digest of 64 hex digits parses"),
        );
    if let Some(annotations) = annotations {
        builder = builder.annotations(annotations);
    }
    builder.build().expect("media type, size and digest are set")
}

/// The union of the template's data ranges, sorted and merged.
fn populated_runs(sources: &[(Range<u64>, &FrozenMemory)]) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = sources
        .iter()
        .map(|(r, _)| r.clone())
        .filter(|r| r.start < r.end)
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

/// Groups `runs` into chunks of at most [`CHUNK_BYTES`], splitting runs that do not fit.
fn chunk_runs(runs: &[Range<u64>]) -> Vec<Vec<Range<u64>>> {
    let mut chunks = Vec::new();
    let (mut current, mut filled) = (Vec::new(), 0);
    for run in runs {
        let mut start = run.start;
        while start < run.end {
            let take = (run.end - start).min(CHUNK_BYTES - filled);
            current.push(start..start + take);
            filled += take;
            start += take;
            if filled == CHUNK_BYTES {
                chunks.push(std::mem::take(&mut current));
                filled = 0;
            }
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// Reads the flattened content of `run` (later sources win) into `buf`.
fn read_run(sources: &[(Range<u64>, &FrozenMemory)], run: &Range<u64>, buf: &mut [u8]) -> io::Result<()> {
    buf.fill(0);
    for (range, memory) in sources {
        let (start, end) = (range.start.max(run.start), range.end.min(run.end));
        if start < end {
            let at = (start - run.start) as usize;
            memory.read_at(&mut buf[at..at + (end - start) as usize], start)?;
        }
    }
    Ok(())
}

/// Tar writer that names blobs by digest and writes each blob once.
struct LayoutWriter<W: Write> {
    tar: tar::Builder<W>,
    written: HashSet<String>,
}

impl<W: Write> LayoutWriter<W> {
    fn file(&mut self, path: &str, bytes: &[u8]) -> io::Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        self.tar.append_data(&mut header, path, bytes)
    }

    fn dir(&mut self, path: &str) -> io::Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_size(0);
        header.set_mode(0o755);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Directory);
        self.tar.append_data(&mut header, path, io::empty())
    }

    fn blob(&mut self, descriptor: &Descriptor, bytes: &[u8]) -> io::Result<()> {
        let hex = descriptor.digest().digest().to_owned();
        if self.written.insert(hex.clone()) {
            self.file(&format!("blobs/sha256/{hex}"), bytes)?;
        }
        Ok(())
    }
}

/// Writes `template` to `out` as an OCI image layout tar (flattened, see the module comment).
pub fn export(template: &Template, out: impl Write) -> Result<ExportSummary, ArchiveError> {
    let memory: &TemplateMemory = template.memory();
    let sources = memory.data_sources().map_err(io_err("find data in the template"))?;
    let runs = populated_runs(&sources);
    let mut layout = LayoutWriter {
        tar: tar::Builder::new(out),
        written: HashSet::new(),
    };
    layout.tar.mode(tar::HeaderMode::Deterministic);
    let write = io_err("write the archive");
    layout.dir("blobs/").map_err(write)?;
    layout.dir("blobs/sha256/").map_err(io_err("write the archive"))?;

    let mut summary = ExportSummary::default();
    let mut layers = Vec::new();
    let mut buf = Vec::new();
    for chunk in chunk_runs(&runs) {
        let bytes: u64 = chunk.iter().map(|r| r.end - r.start).sum();
        buf.resize(bytes as usize, 0);
        let mut at = 0;
        for run in &chunk {
            let len = (run.end - run.start) as usize;
            read_run(&sources, run, &mut buf[at..at + len]).map_err(io_err("read the template"))?;
            at += len;
        }
        let compressed = zstd::bulk::compress(&buf, ZSTD_LEVEL).map_err(io_err("compress a chunk"))?;
        let listed: Vec<[u64; 2]> = chunk.iter().map(|r| [r.start, r.end]).collect();
        let annotations = HashMap::from([(
            RUNS_ANNOTATION.to_owned(),
            serde_json::to_string(&listed).map_err(|e| malformed(e.to_string()))?,
        )]);
        let layer = descriptor(CHUNK_MEDIA_TYPE, &compressed, Some(annotations));
        layout.blob(&layer, &compressed).map_err(io_err("write the archive"))?;
        summary.chunks += 1;
        summary.populated_bytes += bytes;
        summary.compressed_bytes += compressed.len() as u64;
        layers.push(layer);
    }

    let state = serde_json::to_vec(&StateBlob {
        version: STATE_VERSION,
        memory_size: template.size(),
        populated_bytes: summary.populated_bytes,
        state: template.state(),
    })
    .map_err(|e| malformed(e.to_string()))?;
    let config = descriptor(STATE_MEDIA_TYPE, &state, None);
    layout.blob(&config, &state).map_err(io_err("write the archive"))?;

    let manifest = ImageManifestBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageManifest)
        .artifact_type(MediaType::Other(ARTIFACT_TYPE.to_owned()))
        .config(config)
        .layers(layers)
        .build()
        .map_err(|e| malformed(e.to_string()))?;
    let manifest_bytes = manifest.to_string().map_err(|e| malformed(e.to_string()))?.into_bytes();
    let mut manifest_desc = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest_bytes, None);
    manifest_desc.set_media_type(MediaType::ImageManifest);
    manifest_desc.set_artifact_type(Some(MediaType::Other(ARTIFACT_TYPE.to_owned())));
    layout
        .blob(&manifest_desc, &manifest_bytes)
        .map_err(io_err("write the archive"))?;

    let index = ImageIndexBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()
        .map_err(|e| malformed(e.to_string()))?;
    let index = index.to_string().map_err(|e| malformed(e.to_string()))?;
    let layout_file = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()
        .map_err(|e| malformed(e.to_string()))?;
    let layout_json = serde_json::to_vec(&layout_file).map_err(|e| malformed(e.to_string()))?;
    layout
        .file("oci-layout", &layout_json)
        .map_err(io_err("write the archive"))?;
    layout
        .file("index.json", index.as_bytes())
        .map_err(io_err("write the archive"))?;
    let mut out = layout.tar.into_inner().map_err(io_err("finish the archive"))?;
    out.flush().map_err(io_err("write the archive"))?;
    Ok(summary)
}

/// A file of the archive: where its bytes are in the tar file.
#[derive(Clone, Copy)]
struct Member {
    offset: u64,
    size: u64,
}

/// An archive opened for import: the tar's regular files by path.
struct Archive<'a> {
    file: &'a File,
    members: HashMap<String, Member>,
}

impl<'a> Archive<'a> {
    fn open(file: &'a File) -> Result<Self, ArchiveError> {
        let len = file.metadata().map_err(io_err("stat the archive"))?.len();
        let mut reader = file;
        reader.seek(SeekFrom::Start(0)).map_err(io_err("read the archive"))?;
        let mut tar = tar::Archive::new(reader);
        let mut members = HashMap::new();
        let entries = tar
            .entries()
            .map_err(|e| malformed(format!("not a tar archive: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| malformed(format!("tar: {e}")))?;
            if members.len() >= MAX_ENTRIES {
                return Err(malformed(format!("more than {MAX_ENTRIES} files")));
            }
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let path = entry.path().map_err(|e| malformed(format!("tar path: {e}")))?;
            let path = path.to_string_lossy().trim_start_matches("./").to_owned();
            let member = Member {
                offset: entry.raw_file_position(),
                size: entry.size(),
            };
            if member.offset.checked_add(member.size).is_none_or(|end| end > len) {
                return Err(malformed(format!("truncated: {path} ends past the end of the archive")));
            }
            members.insert(path, member);
        }
        Ok(Archive { file, members })
    }

    fn member(&self, path: &str) -> Result<Member, ArchiveError> {
        self.members
            .get(path)
            .copied()
            .ok_or_else(|| malformed(format!("no {path} in the archive (truncated?)")))
    }

    fn read_small(&self, member: Member, what: &str) -> Result<Vec<u8>, ArchiveError> {
        if member.size > MAX_JSON {
            return Err(malformed(format!("{what} is larger than {MAX_JSON} bytes")));
        }
        let mut bytes = vec![0; member.size as usize];
        self.file
            .read_exact_at(&mut bytes, member.offset)
            .map_err(|e| malformed(format!("{what}: {e}")))?;
        Ok(bytes)
    }

    /// The blob `descriptor` names, checked for size (its digest is checked as it is read).
    fn blob(&self, descriptor: &Descriptor) -> Result<Member, ArchiveError> {
        let digest = descriptor.digest();
        if digest.algorithm().as_ref() != "sha256" {
            return Err(ArchiveError::Unsupported(format!("digest algorithm of {digest}")));
        }
        let member = self.member(&format!("blobs/sha256/{}", digest.digest()))?;
        if member.size != descriptor.size() {
            return Err(ArchiveError::Digest {
                digest: digest.to_string(),
                why: format!("{} bytes, the manifest says {}", member.size, descriptor.size()),
            });
        }
        Ok(member)
    }

    /// A small blob read whole and verified.
    fn small_blob(&self, descriptor: &Descriptor, what: &str) -> Result<Vec<u8>, ArchiveError> {
        let bytes = self.read_small(self.blob(descriptor)?, what)?;
        check_digest(descriptor, &sha256_hex(&bytes))?;
        Ok(bytes)
    }
}

fn check_digest(descriptor: &Descriptor, computed: &str) -> Result<(), ArchiveError> {
    let digest = descriptor.digest();
    if digest.digest() != computed {
        return Err(ArchiveError::Digest {
            digest: digest.to_string(),
            why: format!("content hashes to sha256:{computed}"),
        });
    }
    Ok(())
}

/// Reads through to a hasher.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The runs of a chunk, checked to be page-aligned, in order, after `after` and inside `size`.
fn chunk_runs_of(layer: &Descriptor, after: &mut u64, size: u64) -> Result<Vec<Range<u64>>, ArchiveError> {
    let text = layer
        .annotations()
        .as_ref()
        .and_then(|a| a.get(RUNS_ANNOTATION))
        .ok_or_else(|| ArchiveError::Invalid(format!("chunk {} has no {RUNS_ANNOTATION}", layer.digest())))?;
    let listed: Vec<[u64; 2]> =
        serde_json::from_str(text).map_err(|e| ArchiveError::Invalid(format!("{RUNS_ANNOTATION}: {e}")))?;
    let mut runs = Vec::with_capacity(listed.len());
    let mut bytes = 0u64;
    for [start, end] in listed {
        let aligned = start.is_multiple_of(PAGE_SIZE) && end.is_multiple_of(PAGE_SIZE);
        if !aligned || start < *after || end <= start || end > size {
            return Err(ArchiveError::Invalid(format!(
                "memory range {start:#x}..{end:#x} (ranges must be page-aligned, sorted, disjoint and inside {size:#x})"
            )));
        }
        bytes += end - start;
        if bytes > CHUNK_BYTES {
            return Err(ArchiveError::Invalid(format!(
                "a chunk holds more than {CHUNK_BYTES} bytes"
            )));
        }
        *after = end;
        runs.push(start..end);
    }
    Ok(runs)
}

/// Decompresses one chunk into `memfd` at its runs, hashing the compressed bytes; the digest is
/// checked after the whole blob was read.
fn fill_chunk(archive: &Archive, layer: &Descriptor, runs: &[Range<u64>], memfd: &File) -> Result<(), ArchiveError> {
    let member = archive.blob(layer)?;
    let mut source = Hashing {
        inner: io::Read::take(
            PositionedReader {
                file: archive.file,
                at: member.offset,
            },
            member.size,
        ),
        hasher: Sha256::new(),
    };
    let bad = |why: String| ArchiveError::Digest {
        digest: layer.digest().to_string(),
        why,
    };
    let result = (|| -> Result<(), ArchiveError> {
        let mut decoder = zstd::stream::read::Decoder::new(&mut source).map_err(|e| bad(format!("zstd: {e}")))?;
        let mut buf = vec![0u8; 1 << 20];
        for run in runs {
            let mut at = run.start;
            while at < run.end {
                let n = ((run.end - at) as usize).min(buf.len());
                decoder
                    .read_exact(&mut buf[..n])
                    .map_err(|e| bad(format!("decompresses short or badly: {e}")))?;
                memfd
                    .write_all_at(&buf[..n], at)
                    .map_err(io_err("write template memory"))?;
                at += n as u64;
            }
        }
        let mut extra = [0u8; 1];
        if decoder.read(&mut extra).map_err(|e| bad(format!("zstd: {e}")))? != 0 {
            return Err(bad("decompresses to more bytes than its ranges".into()));
        }
        Ok(())
    })();
    // The digest decides first: a flipped byte is a digest mismatch, whatever zstd made of it.
    io::copy(&mut source, &mut io::sink()).map_err(io_err("read the archive"))?;
    let computed: String = source.hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    check_digest(layer, &computed)?;
    result
}

/// Sequential reads at a file offset, without moving a shared cursor.
struct PositionedReader<'a> {
    file: &'a File,
    at: u64,
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

fn check_state(blob: &StateBlob<VmState>) -> Result<(), ArchiveError> {
    if blob.version != STATE_VERSION {
        return Err(ArchiveError::Unsupported(format!(
            "state format version {}; this cowvm reads version {STATE_VERSION}",
            blob.version
        )));
    }
    let size = blob.memory_size;
    let invalid = |reason: String| Err(ArchiveError::Invalid(reason));
    if size != blob.state.memory_size {
        return invalid(format!(
            "memory_size {size} differs from the VM state's {}",
            blob.state.memory_size
        ));
    }
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) || !size.is_multiple_of(PAGE_SIZE) {
        return invalid(format!(
            "memory_size {size} is not a page multiple in {MIN_MEMORY}..={MAX_MEMORY}"
        ));
    }
    if blob.state.vcpus.is_empty() || blob.state.protected_end > size {
        return invalid("the VM state has no vCPU or protects memory beyond its RAM".into());
    }
    let most = cowvm_vmm::boot::layout::MAX_VCPUS;
    if blob.state.vcpus.len() > most {
        return invalid(format!(
            "the VM state has {} vCPUs (at most {most})",
            blob.state.vcpus.len()
        ));
    }
    Ok(())
}

/// The manifest of the archive's cowvm template.
fn manifest(archive: &Archive) -> Result<ImageManifest, ArchiveError> {
    let index = archive.read_small(archive.member("index.json")?, "index.json")?;
    let index = ImageIndex::from_reader(index.as_slice()).map_err(|e| malformed(format!("index.json: {e}")))?;
    let [descriptor] = index.manifests().as_slice() else {
        return Err(ArchiveError::Unsupported(format!(
            "index.json lists {} manifests; a cowvm template archive has one",
            index.manifests().len()
        )));
    };
    if descriptor.media_type() != &MediaType::ImageManifest {
        return Err(ArchiveError::Unsupported(format!(
            "manifest media type {}",
            descriptor.media_type()
        )));
    }
    let bytes = archive.small_blob(descriptor, "the manifest")?;
    let manifest = ImageManifest::from_reader(bytes.as_slice()).map_err(|e| malformed(format!("manifest: {e}")))?;
    let artifact = manifest.artifact_type().as_ref().map(ToString::to_string);
    if artifact.as_deref() != Some(ARTIFACT_TYPE) {
        return Err(ArchiveError::Unsupported(format!(
            "artifactType {artifact:?}, not {ARTIFACT_TYPE} (not a cowvm template)"
        )));
    }
    Ok(manifest)
}

/// Reads and verifies the template in the archive `file` (an OCI layout tar as [`export`]
/// writes it) and builds it as a new template with sealed memory; a template with more than
/// `max_memory` bytes of RAM is refused before any memory is built.
pub fn import(file: &File, max_memory: u64) -> Result<Template, ArchiveError> {
    let archive = Archive::open(file)?;
    let manifest = manifest(&archive)?;
    let config = manifest.config();
    if config.media_type().to_string() != STATE_MEDIA_TYPE {
        return Err(ArchiveError::Unsupported(format!(
            "config media type {}",
            config.media_type()
        )));
    }
    let state = archive.small_blob(config, "the state blob")?;
    let state: StateBlob<VmState> =
        serde_json::from_slice(&state).map_err(|e| ArchiveError::Invalid(format!("state blob: {e}")))?;
    check_state(&state)?;
    let size = state.memory_size;
    if size > max_memory {
        return Err(ArchiveError::TooLarge { size, max_memory });
    }
    let mut after = 0;
    let mut chunks = Vec::with_capacity(manifest.layers().len());
    for layer in manifest.layers() {
        if layer.media_type().to_string() != CHUNK_MEDIA_TYPE {
            return Err(ArchiveError::Unsupported(format!(
                "layer media type {}",
                layer.media_type()
            )));
        }
        chunks.push((layer, chunk_runs_of(layer, &mut after, size)?));
    }
    let populated: u64 = chunks.iter().flat_map(|(_, runs)| runs).map(|r| r.end - r.start).sum();
    if populated != state.populated_bytes {
        return Err(ArchiveError::Invalid(format!(
            "the chunks hold {populated} bytes, the state says {}",
            state.populated_bytes
        )));
    }
    let mut failure = None;
    let filled = FrozenMemory::new_sealed_with(size, |memfd| {
        for (layer, runs) in &chunks {
            if let Err(e) = fill_chunk(&archive, layer, runs, memfd) {
                failure = Some(e);
                return Err(io::Error::other("archive chunk refused"));
            }
        }
        Ok(())
    });
    if let Some(failure) = failure {
        return Err(failure);
    }
    Ok(Template::new(TemplateMemory::single(filled?), state.state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_runs_splits_long_runs_and_packs_short_ones() {
        let runs = vec![0..4096, 8192..8192 + CHUNK_BYTES + 4096];
        let chunks = chunk_runs(&runs);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0], vec![0..4096, 8192..8192 + CHUNK_BYTES - 4096]);
        assert_eq!(chunks[1], vec![8192 + CHUNK_BYTES - 4096..8192 + CHUNK_BYTES + 4096]);
    }

    #[test]
    fn populated_runs_merges_overlapping_layers() {
        let memory = FrozenMemory::new_sealed_with(MIN_MEMORY, |_| Ok(())).expect("memfd");
        let sources = vec![(0..8192, &memory), (4096..12288, &memory), (20480..24576, &memory)];
        assert_eq!(populated_runs(&sources), vec![0..12288, 20480..24576]);
    }
}
