//! Wire protocol v5: framing and message encoding.
//!
//! Every message travels in one frame: `len: u32 BE` (bytes that follow, tag included, at most
//! [`MAX_FRAME`]) then `tag: u8` then the body. Integers are big-endian; strings are
//! `u16 BE length + UTF-8`; optional strings are `u8 0|1` then the string; hashes are 32 raw bytes.
//! The encoding of every message is pinned by a unit test below, so changing it without bumping
//! [`PROTOCOL_VERSION`] fails the build's tests.
//!
//! Compatibility rule: the hello messages (magic + version first) and the `Error` message are
//! frozen for all future versions, so a peer speaking another version can always read the
//! other side's version and say "agent speaks protocol 1, client 2" instead of a garbled stream.
//!
//! The codec is hand-written (not serde/bincode) because the byte layout is the contract: it
//! must stay readable by other versions and be pinned byte for byte.

use std::fmt;

use crate::cbt::Token;
use crate::record::Pieces;

/// The protocol version this build speaks.
///
/// 2: a `Blocks` frame carries its block table first and the payloads after it, back to back
/// (v1 put each payload after its block's entry), so consecutive raw blocks are one contiguous
/// stretch on both sides: the agent encrypts it straight from the disk buffer and the client
/// decrypts it straight into page-aligned memory.
///
/// 3: change-block tracking. `SyncStart` carries the token of the client's last successful
/// round (`changes_since`); the agent answers every `SyncStart` with a `SyncPlan` (hash compare,
/// or "only these changed blocks follow", with the backlog and lag at the cut) and ends a
/// changes round's blocks with `ChangesDone`.
///
/// 4: `SyncStart` carries the client's [`Compression`] choice; in a hash compare the agent sends `SyncDone` right after the last window's `WindowDone`
/// (its digest is final then) instead of on `SyncEnd`; it still answers `Refetch` until
/// `SyncEnd`, which the client sends without waiting for an answer (one round trip less per
/// round over a WAN).
///
/// 5: `SyncResume`: after a dropped connection the client continues a hash-compare round from
/// the end of its verified and written prefix (and the round's cut); the agent answers with a
/// `SyncPlan` (the stream continues at that offset, its `SyncDone` covers only the blocks from
/// there) or refuses with [`ErrorCode::ResumeRefused`] (the client then starts over with
/// `SyncStart`).
pub const PROTOCOL_VERSION: u16 = 5;
/// How the agent encodes the differing blocks of a stream: the client's choice, sent in
/// `SyncStart` (CLI `--compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd-1 while the agent's sends back up (the link is the bottleneck), raw while they
    /// drain (the CPU is): decided again for every batch the agent reads.
    #[default]
    Auto,
    /// zstd-1 for every block it shrinks.
    Zstd,
    /// Never compress.
    None,
}

impl Compression {
    fn to_u8(self) -> u8 {
        match self {
            Compression::Auto => 0,
            Compression::Zstd => 1,
            Compression::None => 2,
        }
    }

    fn from_u8(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            0 => Compression::Auto,
            1 => Compression::Zstd,
            2 => Compression::None,
            other => {
                return Err(FrameError::Malformed(format!(
                    "unknown compression {other}"
                )))
            }
        })
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Compression::Auto),
            "zstd" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            other => Err(format!(
                "compression {other:?}: expected auto, zstd or none"
            )),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Auto => "auto",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        })
    }
}

/// First four bytes of both hello messages.
pub const MAGIC: [u8; 4] = *b"FBRP";
/// Largest frame (tag + body) either side accepts. Block runs are cut well below this.
pub const MAX_FRAME: usize = 16 * 1024 * 1024 + 4096;
/// Largest frame an agent accepts from a client: a `Hashes` window of up to 32768 blocks
/// (clients send windows of 16 MiB of disk: at most 4096 hashes, 128 KiB). Every other client
/// message is a few dozen bytes, so a peer cannot make the agent reserve more per connection.
pub const MAX_CLIENT_FRAME: usize = 32768 * HASH_LEN + 64;
/// `stream` value of an error that concerns the whole connection, not one disk sync.
pub const CONNECTION_STREAM: u32 = u32::MAX;
/// BLAKE3 digest length.
pub const HASH_LEN: usize = 32;

/// A BLAKE3 hash of one block (or of a whole disk's ordered block hashes).
pub type Hash = [u8; HASH_LEN];

/// Error codes carried by [`Message::Error`]. Stable numbers, part of the wire contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// The client certificate does not name the instance this agent serves.
    NotAuthorized,
    /// The request names a disk the agent does not serve.
    UnknownDisk,
    /// The request is malformed or arrived out of order.
    BadRequest,
    /// The agent failed to read its disk.
    Io,
    /// A quiesce/thaw command failed.
    CommandFailed,
    /// The agent refuses the request for now: too many disk syncs on this connection or on the
    /// agent, or a quiesce/thaw command still running (the message names the limit).
    Busy,
    /// The agent cannot continue the round a `SyncResume` names (the message says why); the
    /// client starts the disk over with `SyncStart`.
    ResumeRefused,
    /// A code this build does not know (from a newer peer).
    Other(u16),
}

impl ErrorCode {
    /// Wire number.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::VersionMismatch => 1,
            ErrorCode::NotAuthorized => 2,
            ErrorCode::UnknownDisk => 3,
            ErrorCode::BadRequest => 4,
            ErrorCode::Io => 5,
            ErrorCode::CommandFailed => 6,
            ErrorCode::Busy => 7,
            ErrorCode::ResumeRefused => 8,
            ErrorCode::Other(n) => n,
        }
    }
    /// From a wire number.
    pub fn from_u16(n: u16) -> Self {
        match n {
            1 => ErrorCode::VersionMismatch,
            2 => ErrorCode::NotAuthorized,
            3 => ErrorCode::UnknownDisk,
            4 => ErrorCode::BadRequest,
            5 => ErrorCode::Io,
            6 => ErrorCode::CommandFailed,
            7 => ErrorCode::Busy,
            8 => ErrorCode::ResumeRefused,
            n => ErrorCode::Other(n),
        }
    }
}

/// One disk the agent serves, as announced in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskInfo {
    /// Name the client uses in `--map ID=LOCAL` (the agent's `--disk ID=PATH`).
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size in bytes (512 for image files).
    pub logical_sector_size: u32,
    /// Kernel device name (`nvme1n1`) or the image file name.
    pub device: String,
    /// Device serial number, when the kernel reports one.
    pub serial: Option<String>,
}

/// How a block's payload is encoded in a [`Message::Blocks`] frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// All-zero block; no payload.
    Zero,
    /// Payload is the block as is.
    Raw,
    /// Payload is a zstd frame that decompresses to the block.
    Zstd,
}

impl Encoding {
    fn to_u8(self) -> u8 {
        match self {
            Encoding::Zero => 0,
            Encoding::Raw => 1,
            Encoding::Zstd => 2,
        }
    }
    pub(crate) fn from_u8(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            0 => Encoding::Zero,
            1 => Encoding::Raw,
            2 => Encoding::Zstd,
            other => {
                return Err(FrameError::Malformed(format!(
                    "unknown block encoding {other}"
                )))
            }
        })
    }
}

/// One block inside a [`Message::Blocks`] run. The payload is untrusted until its hash has been
/// checked (see `block::verify_run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireBlock {
    pub encoding: Encoding,
    /// The agent's BLAKE3 hash of the decoded block.
    pub hash: Hash,
    /// A slice of the received frame (no copy).
    pub payload: bytes::Bytes,
    /// BLAKE3 of `payload`, computed by this crate's frame reader as the bytes arrived (while
    /// they were in the CPU cache), so verification need not read them from memory again.
    /// Never taken from the wire; verification still compares it with `hash`.
    pub(crate) arrived: Option<Hash>,
}

impl WireBlock {
    /// A block as sent (nothing computed on arrival).
    pub fn new(encoding: Encoding, hash: Hash, payload: bytes::Bytes) -> Self {
        WireBlock {
            encoding,
            hash,
            payload,
            arrived: None,
        }
    }
}

/// Every message of protocol v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// C→A, first frame: magic and the client's version.
    ClientHello { version: u16 },
    /// A→C, reply to a compatible hello: magic, version, agent software version, the instance
    /// id the agent serves (if scoped).
    AgentHello {
        version: u16,
        software: String,
        instance: Option<String>,
    },
    /// A→C, right after `AgentHello`: the disks served.
    Manifest { disks: Vec<DiskInfo> },
    // (SyncStart below ends with `compression: u8`: 0 auto, 1 zstd, 2 none.)
    /// C→A: start syncing `disk` as stream `stream`; `estimate` = compare only, send no data.
    SyncStart {
        stream: u32,
        disk: String,
        block_size: u32,
        estimate: bool,
        /// The token of the client's last successful round of this disk at this block size
        /// (it holds the hashes of everything it wrote): "send me what changed since". `None`:
        /// hash-compare the whole disk.
        changes_since: Option<Token>,
        /// How the agent encodes the blocks it sends.
        compression: Compression,
    },
    /// A→C, first answer to `SyncStart`: what the round covers. `changes`: only changed blocks
    /// follow (as `Blocks`, then `ChangesDone`), the client sends no hashes; otherwise a hash
    /// compare (the client sends its windows). `token`: this round's cut, for the next
    /// `SyncStart` (none without tracking). `dirty_bytes`/`lag_ms`: changed bytes not yet
    /// delivered and the age of the oldest such change, at the cut. `note`: the tracking
    /// state (`on`, `unavailable: ...`, `rescan: ...`).
    SyncPlan {
        stream: u32,
        changes: bool,
        token: Option<Token>,
        dirty_bytes: u64,
        lag_ms: Option<u64>,
        note: String,
    },
    /// A→C: every changed block of a changes round was sent: `blocks` blocks, `bytes` bytes.
    ChangesDone {
        stream: u32,
        blocks: u64,
        bytes: u64,
    },
    /// C→A: the client's hashes of blocks `first_block..first_block+hashes.len()` (one window).
    Hashes {
        stream: u32,
        first_block: u64,
        hashes: Vec<Hash>,
    },
    /// C→A: send blocks `first_block..+count` again, unconditionally (a block failed verification).
    Refetch {
        stream: u32,
        first_block: u64,
        count: u32,
    },
    /// C→A (protocol 5): continue a hash-compare round of `disk` that a dropped connection
    /// interrupted, as stream `stream`, from byte `offset` (a multiple of `block_size`, inside
    /// the disk): the client verified and wrote everything below it. `cut`: the token of the
    /// interrupted round's `SyncPlan` (`None` from an untracked disk); a tracked agent resumes
    /// only while that is still its last cut, so every write since is still in its dirty map.
    /// Answered like `SyncStart` (a `SyncPlan`, then the client's windows from `offset`) or
    /// with [`ErrorCode::ResumeRefused`].
    SyncResume {
        stream: u32,
        disk: String,
        block_size: u32,
        compression: Compression,
        offset: u64,
        cut: Option<Token>,
    },
    /// C→A: no more windows or refetches for this stream; ends it. In a changes round the agent
    /// answers with `SyncDone`; in a hash compare it sent `SyncDone` after the last window.
    SyncEnd { stream: u32 },
    /// A→C: a run of consecutive differing blocks starting at `first_block`. Encoded as the
    /// block count, then per block `encoding: u8, hash, payload length: u32`, then all
    /// payloads in block order.
    Blocks {
        stream: u32,
        first_block: u64,
        blocks: Vec<WireBlock>,
    },
    /// A→C: the window starting at `first_block` is fully answered; `differing` blocks
    /// (`differing_bytes` decoded bytes) were (or, when estimating, would have been) sent.
    WindowDone {
        stream: u32,
        first_block: u64,
        count: u32,
        differing: u32,
        differing_bytes: u64,
    },
    /// A→C: every block of the stream is compared (hash compare: right after the last
    /// `WindowDone`) or sent (changes round: on `SyncEnd`); `digest` = BLAKE3 over the agent's
    /// ordered block hashes.
    SyncDone {
        stream: u32,
        blocks: u64,
        digest: Hash,
    },
    /// C→A: run the agent's quiesce command (flush/freeze applications before the last round).
    Quiesce,
    /// C→A: run the agent's thaw command.
    Thaw,
    /// A→C: result of `Quiesce`/`Thaw` (command output, or a note that none is configured).
    CommandDone { message: String },
    /// Either direction: a failure. `stream` = [`CONNECTION_STREAM`] for the whole connection.
    Error {
        stream: u32,
        code: ErrorCode,
        message: String,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Length prefix above [`MAX_FRAME`] (or zero).
    #[error("frame length {0} is outside 1..={MAX_FRAME} bytes")]
    BadLength(u64),
    /// Length prefix within [`MAX_FRAME`] but above what this side accepts from this peer
    /// (e.g. [`MAX_CLIENT_FRAME`] on the agent).
    #[error("frame length {len} exceeds the {max} bytes accepted here")]
    TooLarge { len: usize, max: usize },
    /// Unknown message tag.
    #[error("unknown message tag 0x{0:02x}")]
    UnknownTag(u8),
    /// Body shorter than its fields say.
    #[error("message truncated: {0}")]
    Truncated(&'static str),
    /// Bytes left over after the last field.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
    /// A hello without the `FBRP` magic: not our protocol at all.
    #[error("peer does not speak the failback protocol (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// Anything else structurally wrong.
    #[error("malformed message: {0}")]
    Malformed(String),
}

const T_CLIENT_HELLO: u8 = 0x01;
const T_AGENT_HELLO: u8 = 0x02;
const T_MANIFEST: u8 = 0x03;
const T_SYNC_START: u8 = 0x10;
const T_HASHES: u8 = 0x11;
const T_REFETCH: u8 = 0x12;
const T_SYNC_END: u8 = 0x13;
const T_SYNC_RESUME: u8 = 0x14;
/// Tag of [`Message::Blocks`] (the frame reader parses these itself to place payloads).
pub(crate) const T_BLOCKS: u8 = 0x20;
const T_WINDOW_DONE: u8 = 0x21;
const T_SYNC_DONE: u8 = 0x22;
const T_SYNC_PLAN: u8 = 0x23;
const T_CHANGES_DONE: u8 = 0x24;
const T_QUIESCE: u8 = 0x30;
const T_THAW: u8 = 0x31;
const T_COMMAND_DONE: u8 = 0x32;
const T_ERROR: u8 = 0x7f;

impl Message {
    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::ClientHello { .. } => "ClientHello",
            Message::AgentHello { .. } => "AgentHello",
            Message::Manifest { .. } => "Manifest",
            Message::SyncStart { .. } => "SyncStart",
            Message::Hashes { .. } => "Hashes",
            Message::Refetch { .. } => "Refetch",
            Message::SyncEnd { .. } => "SyncEnd",
            Message::SyncResume { .. } => "SyncResume",
            Message::Blocks { .. } => "Blocks",
            Message::WindowDone { .. } => "WindowDone",
            Message::SyncDone { .. } => "SyncDone",
            Message::SyncPlan { .. } => "SyncPlan",
            Message::ChangesDone { .. } => "ChangesDone",
            Message::Quiesce => "Quiesce",
            Message::Thaw => "Thaw",
            Message::CommandDone { .. } => "CommandDone",
            Message::Error { .. } => "Error",
        }
    }

    /// Appends the whole frame (length prefix included) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0]);
        match self {
            Message::ClientHello { version } => {
                out.push(T_CLIENT_HELLO);
                out.extend_from_slice(&MAGIC);
                put_u16(out, *version);
            }
            Message::AgentHello {
                version,
                software,
                instance,
            } => {
                out.push(T_AGENT_HELLO);
                out.extend_from_slice(&MAGIC);
                put_u16(out, *version);
                put_str(out, software);
                put_opt_str(out, instance.as_deref());
            }
            Message::Manifest { disks } => {
                out.push(T_MANIFEST);
                put_u32(out, len_u32(disks.len()));
                for d in disks {
                    put_str(out, &d.id);
                    put_u64(out, d.size);
                    put_u32(out, d.logical_sector_size);
                    put_str(out, &d.device);
                    put_opt_str(out, d.serial.as_deref());
                }
            }
            Message::SyncStart {
                stream,
                disk,
                block_size,
                estimate,
                changes_since,
                compression,
            } => {
                out.push(T_SYNC_START);
                put_u32(out, *stream);
                put_str(out, disk);
                put_u32(out, *block_size);
                out.push(u8::from(*estimate));
                put_opt_token(out, changes_since.as_ref());
                out.push(compression.to_u8());
            }
            Message::SyncPlan {
                stream,
                changes,
                token,
                dirty_bytes,
                lag_ms,
                note,
            } => {
                out.push(T_SYNC_PLAN);
                put_u32(out, *stream);
                out.push(u8::from(*changes));
                put_opt_token(out, token.as_ref());
                put_u64(out, *dirty_bytes);
                match lag_ms {
                    None => out.push(0),
                    Some(l) => {
                        out.push(1);
                        put_u64(out, *l);
                    }
                }
                put_str(out, note);
            }
            Message::ChangesDone {
                stream,
                blocks,
                bytes,
            } => {
                out.push(T_CHANGES_DONE);
                put_u32(out, *stream);
                put_u64(out, *blocks);
                put_u64(out, *bytes);
            }
            Message::Hashes {
                stream,
                first_block,
                hashes,
            } => {
                out.push(T_HASHES);
                put_u32(out, *stream);
                put_u64(out, *first_block);
                put_u32(out, len_u32(hashes.len()));
                for h in hashes {
                    out.extend_from_slice(h);
                }
            }
            Message::Refetch {
                stream,
                first_block,
                count,
            } => {
                out.push(T_REFETCH);
                put_u32(out, *stream);
                put_u64(out, *first_block);
                put_u32(out, *count);
            }
            Message::SyncEnd { stream } => {
                out.push(T_SYNC_END);
                put_u32(out, *stream);
            }
            Message::SyncResume {
                stream,
                disk,
                block_size,
                compression,
                offset,
                cut,
            } => {
                out.push(T_SYNC_RESUME);
                put_u32(out, *stream);
                put_str(out, disk);
                put_u32(out, *block_size);
                out.push(compression.to_u8());
                put_u64(out, *offset);
                put_opt_token(out, cut.as_ref());
            }
            Message::Blocks {
                stream,
                first_block,
                blocks,
            } => {
                out.push(T_BLOCKS);
                put_u32(out, *stream);
                put_u64(out, *first_block);
                put_u32(out, len_u32(blocks.len()));
                for b in blocks {
                    out.push(b.encoding.to_u8());
                    out.extend_from_slice(&b.hash);
                    put_u32(out, len_u32(b.payload.len()));
                }
                for b in blocks {
                    out.extend_from_slice(&b.payload);
                }
            }
            Message::WindowDone {
                stream,
                first_block,
                count,
                differing,
                differing_bytes,
            } => {
                out.push(T_WINDOW_DONE);
                put_u32(out, *stream);
                put_u64(out, *first_block);
                put_u32(out, *count);
                put_u32(out, *differing);
                put_u64(out, *differing_bytes);
            }
            Message::SyncDone {
                stream,
                blocks,
                digest,
            } => {
                out.push(T_SYNC_DONE);
                put_u32(out, *stream);
                put_u64(out, *blocks);
                out.extend_from_slice(digest);
            }
            Message::Quiesce => out.push(T_QUIESCE),
            Message::Thaw => out.push(T_THAW),
            Message::CommandDone { message } => {
                out.push(T_COMMAND_DONE);
                put_str(out, message);
            }
            Message::Error {
                stream,
                code,
                message,
            } => {
                out.push(T_ERROR);
                put_u32(out, *stream);
                put_u16(out, code.to_u16());
                put_str(out, message);
            }
        }
        let body = len_u32(out.len() - start - 4);
        out[start..start + 4].copy_from_slice(&body.to_be_bytes());
    }

    /// The whole frame as a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// Decodes one frame body (tag + fields, without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Message, FrameError> {
        Self::decode_shared(&bytes::Bytes::copy_from_slice(body))
    }

    /// Like [`decode`](Self::decode); block payloads become slices of `shared` (no copy).
    pub fn decode_shared(shared: &bytes::Bytes) -> Result<Message, FrameError> {
        let mut r = Reader { buf: &shared[..] };
        let tag = r.u8("tag")?;
        let msg = match tag {
            T_CLIENT_HELLO => {
                r.magic()?;
                Message::ClientHello {
                    version: r.u16("version")?,
                }
            }
            T_AGENT_HELLO => {
                r.magic()?;
                let version = r.u16("version")?;
                if version != PROTOCOL_VERSION {
                    // Frozen prefix only: a newer agent may add fields we cannot parse.
                    return Ok(Message::AgentHello {
                        version,
                        software: String::new(),
                        instance: None,
                    });
                }
                Message::AgentHello {
                    version,
                    software: r.string("software")?,
                    instance: r.opt_string("instance")?,
                }
            }
            T_MANIFEST => {
                let n = r.u32("disk count")?;
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > r.buf.len() / MIN_DISK_ENTRY {
                    return Err(FrameError::Truncated("disk list"));
                }
                // Reserved once (grown by doubling, the list held ~2x its size at times).
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    disks.push(DiskInfo {
                        id: r.string("disk id")?,
                        size: r.u64("disk size")?,
                        logical_sector_size: r.u32("sector size")?,
                        device: r.string("device")?,
                        serial: r.opt_string("serial")?,
                    });
                }
                Message::Manifest { disks }
            }
            T_SYNC_START => Message::SyncStart {
                stream: r.u32("stream")?,
                disk: r.string("disk")?,
                block_size: r.u32("block size")?,
                estimate: r.bool("estimate")?,
                changes_since: r.opt_token("changes since")?,
                compression: Compression::from_u8(r.u8("compression")?)?,
            },
            T_SYNC_PLAN => Message::SyncPlan {
                stream: r.u32("stream")?,
                changes: r.bool("changes")?,
                token: r.opt_token("token")?,
                dirty_bytes: r.u64("dirty bytes")?,
                lag_ms: if r.bool("lag")? {
                    Some(r.u64("lag")?)
                } else {
                    None
                },
                note: r.string("note")?,
            },
            T_CHANGES_DONE => Message::ChangesDone {
                stream: r.u32("stream")?,
                blocks: r.u64("blocks")?,
                bytes: r.u64("bytes")?,
            },
            T_HASHES => {
                let stream = r.u32("stream")?;
                let first_block = r.u64("first block")?;
                let n = r.u32("hash count")?;
                let need = usize::try_from(n)
                    .ok()
                    .and_then(|n| n.checked_mul(HASH_LEN))
                    .ok_or(FrameError::Truncated("hashes"))?;
                let raw = r.take(need, "hashes")?;
                let hashes = raw
                    .chunks_exact(HASH_LEN)
                    .map(|c| {
                        let mut h = [0u8; HASH_LEN];
                        h.copy_from_slice(c);
                        h
                    })
                    .collect();
                Message::Hashes {
                    stream,
                    first_block,
                    hashes,
                }
            }
            T_REFETCH => Message::Refetch {
                stream: r.u32("stream")?,
                first_block: r.u64("first block")?,
                count: r.u32("count")?,
            },
            T_SYNC_END => Message::SyncEnd {
                stream: r.u32("stream")?,
            },
            T_SYNC_RESUME => Message::SyncResume {
                stream: r.u32("stream")?,
                disk: r.string("disk")?,
                block_size: r.u32("block size")?,
                compression: Compression::from_u8(r.u8("compression")?)?,
                offset: r.u64("offset")?,
                cut: r.opt_token("cut")?,
            },
            T_BLOCKS => {
                let stream = r.u32("stream")?;
                let first_block = r.u64("first block")?;
                let n = r.u32("block count")?;
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > r.buf.len() / BLOCK_ENTRY {
                    return Err(FrameError::Truncated("block table"));
                }
                let mut table = Vec::with_capacity(n);
                for _ in 0..n {
                    let encoding = Encoding::from_u8(r.u8("encoding")?)?;
                    let hash = r.hash("block hash")?;
                    let len = r.u32("payload length")?;
                    let len = usize::try_from(len).map_err(|_| FrameError::Truncated("payload"))?;
                    if encoding == Encoding::Zero && len > 0 {
                        return Err(FrameError::Malformed(
                            "zero-marker block carries a payload".into(),
                        ));
                    }
                    table.push((encoding, hash, len));
                }
                let mut blocks = Vec::with_capacity(n);
                for (encoding, hash, len) in table {
                    let at = shared.len() - r.buf.len();
                    r.take(len, "block payload")?;
                    blocks.push(WireBlock::new(encoding, hash, shared.slice(at..at + len)));
                }
                Message::Blocks {
                    stream,
                    first_block,
                    blocks,
                }
            }
            T_WINDOW_DONE => Message::WindowDone {
                stream: r.u32("stream")?,
                first_block: r.u64("first block")?,
                count: r.u32("count")?,
                differing: r.u32("differing")?,
                differing_bytes: r.u64("differing bytes")?,
            },
            T_SYNC_DONE => Message::SyncDone {
                stream: r.u32("stream")?,
                blocks: r.u64("blocks")?,
                digest: r.hash("digest")?,
            },
            T_QUIESCE => Message::Quiesce,
            T_THAW => Message::Thaw,
            T_COMMAND_DONE => Message::CommandDone {
                message: r.string("message")?,
            },
            T_ERROR => Message::Error {
                stream: r.u32("stream")?,
                code: ErrorCode::from_u16(r.u16("code")?),
                message: r.string("message")?,
            },
            other => return Err(FrameError::UnknownTag(other)),
        };
        if !r.buf.is_empty() {
            return Err(FrameError::Trailing(r.buf.len()));
        }
        Ok(msg)
    }
}

/// Fewest bytes of one disk in a `Manifest`: empty id, size, sector size, empty device, no
/// serial.
const MIN_DISK_ENTRY: usize = 2 + 8 + 4 + 2 + 1;

/// Bytes of one block's entry in a `Blocks` frame's table: encoding, hash, payload length.
pub const BLOCK_ENTRY: usize = 1 + HASH_LEN + 4;

/// Builds a `Blocks` frame without copying payloads: the table grows in a small buffer, the
/// payloads stay slices of the buffers they were read into (consecutive blocks of one buffer
/// become one slice), and [`crate::record::TlsWriter::write_pieces`] encrypts them from there.
/// Produces exactly the bytes of [`Message::Blocks`] as plaintext.
#[derive(Debug)]
pub struct BlocksFrame {
    head: Vec<u8>,
    pieces: Vec<bytes::Bytes>,
    /// The buffer the last piece is a slice of (its address and length) and where the piece
    /// ends in it: a block right after it in the same buffer extends the piece.
    last: Option<(usize, usize, usize)>,
    payload: usize,
    first_block: u64,
    count: u32,
}

impl BlocksFrame {
    /// Bytes before the table: length, tag, stream, first block, count.
    const HEADER: usize = 4 + 1 + 4 + 8 + 4;

    /// Starts a run at `first_block` of `stream`, with room in the table for `blocks` blocks.
    pub fn new(stream: u32, first_block: u64, blocks: usize) -> Self {
        let mut head = Vec::with_capacity(Self::HEADER + blocks * BLOCK_ENTRY);
        head.extend_from_slice(&[0, 0, 0, 0, T_BLOCKS]);
        put_u32(&mut head, stream);
        put_u64(&mut head, first_block);
        put_u32(&mut head, 0);
        BlocksFrame {
            head,
            pieces: Vec::new(),
            last: None,
            payload: 0,
            first_block,
            count: 0,
        }
    }

    /// Index of the block the next `push` adds.
    pub fn next_block(&self) -> u64 {
        self.first_block + u64::from(self.count)
    }

    /// Encoded size so far.
    pub fn len(&self) -> usize {
        self.head.len() + self.payload
    }

    /// True when no block was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends a block whose payload is `buf[range]` (`buf` is kept, not copied).
    pub fn push(
        &mut self,
        encoding: Encoding,
        hash: &Hash,
        buf: &bytes::Bytes,
        range: std::ops::Range<usize>,
    ) {
        self.head.push(encoding.to_u8());
        self.head.extend_from_slice(hash);
        put_u32(&mut self.head, len_u32(range.len()));
        self.count += 1;
        if range.is_empty() {
            return;
        }
        self.payload += range.len();
        let id = (buf.as_ptr().addr(), buf.len());
        match (&mut self.last, self.pieces.last_mut()) {
            (Some((addr, len, end)), Some(piece)) if (*addr, *len) == id && *end == range.start => {
                *piece = buf.slice(range.start - piece.len()..range.end);
                *end = range.end;
            }
            _ => {
                self.pieces.push(buf.slice(range.clone()));
                self.last = Some((id.0, id.1, range.end));
            }
        }
    }

    /// Appends a block with its own payload.
    pub fn push_owned(&mut self, encoding: Encoding, hash: &Hash, payload: Vec<u8>) {
        let b = bytes::Bytes::from(payload);
        self.push(encoding, hash, &b, 0..b.len());
    }

    /// Appends block `buf[range]` whose BLAKE3 hash is `hash` (`None`: hashed here),
    /// zstd-compressed when `compress` returns a smaller encoding. Returns the hash.
    ///
    /// `buf` may be a memory map of a live disk that changes while this runs (or before the
    /// frame is encrypted); then the bytes sent can differ from the hash sent. The client's
    /// check catches that like corruption in transit and asks for the block again, and the
    /// agent answers a refetch from a private copy, hashed after reading, so the retry matches.
    pub fn push_hashed(
        &mut self,
        buf: &bytes::Bytes,
        range: std::ops::Range<usize>,
        hash: Option<Hash>,
        compress: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
    ) -> Hash {
        let data = &buf[range.clone()];
        let hash = hash.unwrap_or_else(|| *blake3::hash(data).as_bytes());
        match compress(data) {
            Some(z) => self.push_owned(Encoding::Zstd, &hash, z),
            None => self.push(Encoding::Raw, &hash, buf, range),
        }
        hash
    }

    /// The finished frame, for [`crate::record::TlsWriter::write_pieces`].
    pub fn finish(mut self) -> Pieces {
        let body = len_u32(self.len() - 4);
        self.head[..4].copy_from_slice(&body.to_be_bytes());
        self.head[Self::HEADER - 4..Self::HEADER].copy_from_slice(&self.count.to_be_bytes());
        Pieces {
            head: self.head,
            pieces: self.pieces,
        }
    }
}

/// Parses a 4-byte length prefix and checks it against [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let n = u32::from_be_bytes(prefix);
    let n_usize = usize::try_from(n).map_err(|_| FrameError::BadLength(u64::from(n)))?;
    if n_usize == 0 || n_usize > MAX_FRAME {
        return Err(FrameError::BadLength(u64::from(n)));
    }
    Ok(n_usize)
}

/// Lengths inside one frame are bounded by [`MAX_FRAME`], so they always fit in u32.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).expect("length inside a frame exceeds u32")
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_str(out: &mut Vec<u8>, s: &str) {
    // Strings on the wire are names and messages; cut (at a char boundary) rather than fail.
    let mut end = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_u16(out, u16::try_from(end).unwrap_or(u16::MAX));
    out.extend_from_slice(&s.as_bytes()[..end]);
}
fn put_opt_token(out: &mut Vec<u8>, t: Option<&Token>) {
    match t {
        None => out.push(0),
        Some(t) => {
            out.push(1);
            put_u64(out, t.session);
            put_u64(out, t.cut);
        }
    }
}
fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(self.take(1, what)?[0])
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, FrameError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(FrameError::Malformed(format!("{what}: boolean byte {v}"))),
        }
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn hash(&mut self, what: &'static str) -> Result<Hash, FrameError> {
        let b = self.take(HASH_LEN, what)?;
        let mut h = [0u8; HASH_LEN];
        h.copy_from_slice(b);
        Ok(h)
    }
    fn string(&mut self, what: &'static str) -> Result<String, FrameError> {
        let n = self.u16(what)?;
        let b = self.take(usize::from(n), what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| FrameError::Malformed(format!("{what} is not UTF-8")))
    }
    fn opt_string(&mut self, what: &'static str) -> Result<Option<String>, FrameError> {
        if self.bool(what)? {
            Ok(Some(self.string(what)?))
        } else {
            Ok(None)
        }
    }
    fn opt_token(&mut self, what: &'static str) -> Result<Option<Token>, FrameError> {
        if self.bool(what)? {
            Ok(Some(Token {
                session: self.u64(what)?,
                cut: self.u64(what)?,
            }))
        } else {
            Ok(None)
        }
    }
    fn magic(&mut self) -> Result<(), FrameError> {
        let b = self.take(4, "magic")?;
        let mut m = [0u8; 4];
        m.copy_from_slice(b);
        if m != MAGIC {
            return Err(FrameError::BadMagic(m));
        }
        Ok(())
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorCode::VersionMismatch => "version mismatch",
            ErrorCode::NotAuthorized => "not authorized",
            ErrorCode::UnknownDisk => "unknown disk",
            ErrorCode::BadRequest => "bad request",
            ErrorCode::Io => "agent I/O error",
            ErrorCode::CommandFailed => "command failed",
            ErrorCode::Busy => "agent busy",
            ErrorCode::ResumeRefused => "resume refused",
            ErrorCode::Other(n) => return write!(f, "error code {n}"),
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Pins the byte encoding of every message: a change here is a protocol change and needs a
    /// new PROTOCOL_VERSION.
    #[test]
    fn encoding_is_pinned() {
        let h1 = [0x11u8; 32];
        let h2 = [0x22u8; 32];
        let cases: Vec<(Message, String)> = vec![
            (
                Message::ClientHello { version: 5 },
                "0000000701464252500005".into(),
            ),
            (
                Message::AgentHello {
                    version: 5,
                    software: "0.1".into(),
                    instance: Some("i-1".into()),
                },
                "0000001202464252500005000330 2e3101000369 2d31".replace(' ', ""),
            ),
            (
                Message::Manifest {
                    disks: vec![DiskInfo {
                        id: "d0".into(),
                        size: 4096,
                        logical_sector_size: 512,
                        device: "vda".into(),
                        serial: None,
                    }],
                },
                "0000001b0300000001000264300000000000001000000002000003766461 00".replace(' ', ""),
            ),
            (
                Message::SyncStart {
                    stream: 7,
                    disk: "d0".into(),
                    block_size: 65536,
                    estimate: true,
                    changes_since: None,
                    compression: Compression::Auto,
                },
                "0000001010000000070002643000010000 01 00 00".replace(' ', ""),
            ),
            (
                Message::SyncStart {
                    stream: 7,
                    disk: "d0".into(),
                    block_size: 65536,
                    estimate: false,
                    changes_since: Some(Token {
                        session: 0x0102,
                        cut: 3,
                    }),
                    compression: Compression::None,
                },
                "0000002010000000070002643000010000 00 01 0000000000000102 0000000000000003 02"
                    .replace(' ', ""),
            ),
            (
                Message::SyncPlan {
                    stream: 7,
                    changes: true,
                    token: Some(Token {
                        session: 0x0102,
                        cut: 4,
                    }),
                    dirty_bytes: 65536,
                    lag_ms: Some(1500),
                    note: "on".into(),
                },
                "0000002c23 00000007 01 01 0000000000000102 0000000000000004 0000000000010000 \
                 01 00000000000005dc 0002 6f6e"
                    .replace(' ', ""),
            ),
            (
                Message::ChangesDone {
                    stream: 7,
                    blocks: 2,
                    bytes: 131072,
                },
                "0000001524000000070000000000000002 0000000000020000".replace(' ', ""),
            ),
            (
                Message::Hashes {
                    stream: 1,
                    first_block: 2,
                    hashes: vec![h1, h2],
                },
                format!(
                    "00000051110000000100000000000000020000000 2{}{}",
                    hex(&h1),
                    hex(&h2)
                )
                .replace(' ', ""),
            ),
            (
                Message::Refetch {
                    stream: 1,
                    first_block: 9,
                    count: 1,
                },
                "00000011120000000100000000000000090000000 1".replace(' ', ""),
            ),
            (Message::SyncEnd { stream: 3 }, "000000051300000003".into()),
            (
                Message::SyncResume {
                    stream: 3,
                    disk: "d0".into(),
                    block_size: 65536,
                    compression: Compression::Zstd,
                    offset: 0x0100_0000,
                    cut: Some(Token {
                        session: 0x0102,
                        cut: 3,
                    }),
                },
                "00000027 14 00000003 00026430 00010000 01 0000000001000000 01 0000000000000102 0000000000000003"
                    .replace(' ', ""),
            ),
            (
                Message::Blocks {
                    stream: 1,
                    first_block: 5,
                    blocks: vec![
                        WireBlock::new(Encoding::Raw, h2, vec![0xab, 0xcd].into()),
                        WireBlock::new(Encoding::Zero, h1, vec![].into()),
                    ],
                },
                // v2: the table, then the payloads.
                format!(
                    "0000005d20000000010000000000000005000000 02 01{}00000002 00{}00000000 abcd",
                    hex(&h2),
                    hex(&h1)
                )
                .replace(' ', ""),
            ),
            (
                Message::WindowDone {
                    stream: 1,
                    first_block: 256,
                    count: 256,
                    differing: 3,
                    differing_bytes: 196608,
                },
                "0000001d21000000010000000000000100000001000000000300000000 00030000"
                    .replace(' ', ""),
            ),
            (
                Message::SyncDone {
                    stream: 1,
                    blocks: 16,
                    digest: h1,
                },
                format!("0000002d22000000010000000000000010{}", hex(&h1)),
            ),
            (Message::Quiesce, "0000000130".into()),
            (Message::Thaw, "0000000131".into()),
            (
                Message::CommandDone {
                    message: "ok".into(),
                },
                "0000000532 00026f6b".replace(' ', ""),
            ),
            (
                Message::Error {
                    stream: CONNECTION_STREAM,
                    code: ErrorCode::VersionMismatch,
                    message: "v".into(),
                },
                "0000000a7fffffffff00010001 76".replace(' ', ""),
            ),
        ];
        for (msg, want) in cases {
            let got = msg.encode();
            assert_eq!(hex(&got), want, "encoding of {}", msg.name());
            let body = &got[4..];
            assert_eq!(frame_len(got[..4].try_into().unwrap()).unwrap(), body.len());
            assert_eq!(
                Message::decode(body).unwrap(),
                msg,
                "round trip {}",
                msg.name()
            );
        }
    }

    #[test]
    fn blocks_frame_builder_matches_message_encoding() {
        let blocks = vec![
            WireBlock::new(Encoding::Zero, [1; 32], vec![].into()),
            WireBlock::new(Encoding::Zstd, [2; 32], vec![9, 8, 7].into()),
            WireBlock::new(Encoding::Raw, [3; 32], vec![4; 5000].into()),
        ];
        let mut f = BlocksFrame::new(4, 77, 0);
        for b in &blocks {
            f.push(b.encoding, &b.hash, &b.payload, 0..b.payload.len());
        }
        assert_eq!(f.next_block(), 80);
        let want = Message::Blocks {
            stream: 4,
            first_block: 77,
            blocks,
        }
        .encode();
        assert_eq!(f.len(), want.len());
        assert_eq!(f.finish().to_plain(), want);
    }

    /// Blocks that lie next to each other in one buffer travel as one piece (encrypted in one
    /// stretch); a gap, another buffer or an owned payload starts a new piece.
    #[test]
    fn push_hashed_joins_neighbours_and_encodes_like_push() {
        let disk = bytes::Bytes::from(failback_tests::random_bytes(5, 4 * 4096));
        let other = bytes::Bytes::from(failback_tests::random_bytes(6, 4096));
        let mut a = BlocksFrame::new(1, 10, 8);
        let h0 = a.push_hashed(&disk, 0..4096, None, |_| None);
        let h1 = a.push_hashed(&disk, 4096..8192, Some([3; 32]), |_| None);
        let h2 = a.push_hashed(&disk, 8192..12288, None, |_| Some(vec![5, 6, 7]));
        a.push(Encoding::Zero, &[0; 32], &disk, 0..0);
        let h4 = a.push_hashed(&disk, 12288..16384, None, |_| None);
        let h5 = a.push_hashed(&other, 0..4096, None, |_| None);
        assert_eq!(h0, *blake3::hash(&disk[..4096]).as_bytes());
        assert_eq!(h1, [3; 32], "a known hash is sent as given");
        assert_eq!(h2, *blake3::hash(&disk[8192..12288]).as_bytes());
        let lens: Vec<usize> = a.pieces.iter().map(bytes::Bytes::len).collect();
        assert_eq!(
            lens,
            [8192, 3, 4096, 4096],
            "neighbours joined, the rest apart"
        );
        let mut b = BlocksFrame::new(1, 10, 0);
        b.push_owned(Encoding::Raw, &h0, disk[..4096].to_vec());
        b.push_owned(Encoding::Raw, &h1, disk[4096..8192].to_vec());
        b.push_owned(Encoding::Zstd, &h2, vec![5, 6, 7]);
        b.push_owned(Encoding::Zero, &[0; 32], Vec::new());
        b.push_owned(Encoding::Raw, &h4, disk[12288..].to_vec());
        b.push_owned(Encoding::Raw, &h5, other.to_vec());
        let plain = a.finish().to_plain();
        assert_eq!(plain, b.finish().to_plain());
        let Message::Blocks { blocks, .. } = Message::decode(&plain[4..]).unwrap() else {
            panic!("not blocks")
        };
        assert_eq!(blocks.len(), 6);
        assert_eq!(blocks[4].payload, disk[12288..]);
    }

    /// Error codes are part of the wire contract: new ones are added, none renumbered.
    #[test]
    fn error_codes_keep_their_numbers() {
        let codes = [
            (ErrorCode::VersionMismatch, 1),
            (ErrorCode::NotAuthorized, 2),
            (ErrorCode::UnknownDisk, 3),
            (ErrorCode::BadRequest, 4),
            (ErrorCode::Io, 5),
            (ErrorCode::CommandFailed, 6),
            (ErrorCode::Busy, 7),
            (ErrorCode::ResumeRefused, 8),
            (ErrorCode::Other(9), 9),
        ];
        for (code, n) in codes {
            assert_eq!((code.to_u16(), ErrorCode::from_u16(n)), (n, code));
        }
    }

    #[test]
    fn garbage_is_rejected_clearly() {
        assert_eq!(Message::decode(&[0x99]), Err(FrameError::UnknownTag(0x99)));
        assert!(matches!(
            Message::decode(&[T_CLIENT_HELLO, b'G', b'E', b'T', b' ']),
            Err(FrameError::BadMagic(_))
        ));
        let full = Message::SyncEnd { stream: 3 }.encode();
        assert!(matches!(
            Message::decode(&full[4..full.len() - 1]),
            Err(FrameError::Truncated(_))
        ));
        let mut long = full[4..].to_vec();
        long.push(0);
        assert_eq!(Message::decode(&long), Err(FrameError::Trailing(1)));
        assert!(frame_len([0, 0, 0, 0]).is_err());
        assert!(frame_len([0xff, 0xff, 0xff, 0xff]).is_err());
        // A huge hash count must not allocate or panic.
        let mut m = vec![T_HASHES];
        m.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert!(Message::decode(&m).is_err());
    }
}
