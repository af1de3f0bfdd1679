//! NBD wire constants and the fixed-size structures of the protocol (all big-endian).

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic (server greeting and every client option).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server accepts clients that omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS (unsupported).
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Structured replies (unsupported).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export in a LIST reply.
pub const REP_SERVER: u32 = 2;
/// One information item in an INFO/GO reply.
pub const REP_INFO: u32 = 3;
/// Option not supported.
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
/// Option malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
/// Export unknown.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

/// Information types inside `REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
/// The export's name.
pub const INFO_NAME: u16 = 1;
/// Free-text description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Server supports FLUSH.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Server supports FUA.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Server supports TRIM.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Server supports WRITE_ZEROES.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Flush on one connection covers all connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES must allocate (no hole).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Largest READ/WRITE payload we accept (advertised as the maximum block size). Bounds the
/// memory one request can make us allocate.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size advertised to clients.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Longest option payload we read (export names are short; bounds allocation).
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// A transmission request header (28 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub cmd: u16,
    /// Client cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Wire size of the header.
    pub const SIZE: usize = 28;

    /// Parses a header; `Err(magic)` when the magic is wrong.
    pub fn parse(b: &[u8; Self::SIZE]) -> Result<Self, u32> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            cmd: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }

    /// Encodes a header (used by tests and tools).
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(errno: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Name of a command for logs.
pub fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disc",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_WRITE_ZEROES => "write_zeroes",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            cookie: 0xdead_beef,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(Request::parse(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[0] = 0;
        assert_eq!(Request::parse(&bad), Err(0x0060_9513));
    }
}
