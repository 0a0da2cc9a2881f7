//! Whole messages on a stream: a 4-byte little-endian length, then that
//! many bytes. One reader and one writer for blocking streams (std `Read`
//! and `Write`) and, with the `tokio` feature, one of each for tokio
//! streams, over the same checks: a length over [`MAX_MESSAGE`] is an
//! error before anything is allocated or written.

use std::io::{self, Read, Write};

use super::{framed, MAX_MESSAGE};

/// Bytes of the length prefix.
const PREFIX_LEN: usize = 4;

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The stream ended between two messages: the peer closed it.
    #[error("the peer closed the connection")]
    Closed,
    /// The stream ended inside a message (its length or its bytes).
    #[error("the connection ended inside a message")]
    Truncated,
    /// A length over [`MAX_MESSAGE`]: read from a peer (nothing was
    /// allocated for it), or asked of the writer (nothing was written).
    #[error("message of {len} bytes is longer than {MAX_MESSAGE}")]
    TooLong {
        /// The length.
        len: usize,
    },
    /// The stream failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl MessageError {
    /// The error as an I/O error kind: `UnexpectedEof` for a stream that
    /// ended, `InvalidData` for a length over the limit.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Self::Closed | Self::Truncated => io::ErrorKind::UnexpectedEof,
            Self::TooLong { .. } => io::ErrorKind::InvalidData,
            Self::Io(e) => e.kind(),
        }
    }
}

impl From<MessageError> for io::Error {
    fn from(e: MessageError) -> Self {
        match e {
            MessageError::Io(e) => e,
            other => io::Error::new(other.kind(), other),
        }
    }
}

/// The length a prefix announces, if it is within the limit.
fn checked_len(prefix: [u8; PREFIX_LEN]) -> Result<usize, MessageError> {
    // A u32 always fits a usize on the targets this runs on (64-bit Linux);
    // were it not to, it would be over the limit.
    let len = usize::try_from(u32::from_le_bytes(prefix)).unwrap_or(usize::MAX);
    match len > MAX_MESSAGE {
        true => Err(MessageError::TooLong { len }),
        false => Ok(len),
    }
}

/// The message with its prefix, if it is within the limit.
fn checked_framed(msg: &[u8]) -> Result<Vec<u8>, MessageError> {
    match msg.len() > MAX_MESSAGE {
        true => Err(MessageError::TooLong { len: msg.len() }),
        false => Ok(framed(msg)),
    }
}

/// What a stream that ended after `got` bytes of a prefix means.
fn ended(got: usize) -> MessageError {
    match got {
        0 => MessageError::Closed,
        _ => MessageError::Truncated,
    }
}

/// A failed read of a message's bytes, whose length was read.
fn in_body(e: io::Error) -> MessageError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => MessageError::Truncated,
        _ => MessageError::Io(e),
    }
}

/// Reads one message from a blocking stream.
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Vec<u8>, MessageError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut got = 0;
    while got < PREFIX_LEN {
        match r.read(&mut prefix[got..]) {
            Ok(0) => return Err(ended(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut buf = vec![0u8; checked_len(prefix)?];
    r.read_exact(&mut buf).map_err(in_body)?;
    Ok(buf)
}

/// Writes one message to a blocking stream, prefix and bytes in one
/// `write_all`.
pub fn write_message<W: Write + ?Sized>(w: &mut W, msg: &[u8]) -> Result<(), MessageError> {
    w.write_all(&checked_framed(msg)?)?;
    Ok(())
}

/// Reads one message from a tokio stream. Not cancel-safe: a message
/// read in part is lost if the future is dropped.
#[cfg(feature = "tokio")]
pub async fn read_message_async<R>(r: &mut R) -> Result<Vec<u8>, MessageError>
where
    R: tokio::io::AsyncRead + Unpin + ?Sized,
{
    use tokio::io::AsyncReadExt;

    let mut prefix = [0u8; PREFIX_LEN];
    let mut got = 0;
    while got < PREFIX_LEN {
        match r.read(&mut prefix[got..]).await {
            Ok(0) => return Err(ended(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut buf = vec![0u8; checked_len(prefix)?];
    r.read_exact(&mut buf).await.map_err(in_body)?;
    Ok(buf)
}

/// Writes one message to a tokio stream, prefix and bytes in one
/// `write_all`.
#[cfg(feature = "tokio")]
pub async fn write_message_async<W>(w: &mut W, msg: &[u8]) -> Result<(), MessageError>
where
    W: tokio::io::AsyncWrite + Unpin + ?Sized,
{
    use tokio::io::AsyncWriteExt;

    w.write_all(&checked_framed(msg)?).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stream bytes of `msgs`, each framed.
    fn stream(msgs: &[&[u8]]) -> Vec<u8> {
        msgs.iter().flat_map(|m| framed(m)).collect()
    }

    /// A reader that hands out one byte per call, and `Interrupted` before
    /// each, as a slow socket interrupted by signals would.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        interrupt: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            match (self.bytes.get(self.at), buf.first_mut()) {
                (Some(&b), Some(d)) => {
                    *d = b;
                    self.at += 1;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn reads_what_it_writes() {
        let big = vec![7u8; MAX_MESSAGE];
        let mut out = Vec::new();
        for m in [&b"\x01{}"[..], &[], &big] {
            write_message(&mut out, m).unwrap();
        }
        assert_eq!(out, stream(&[b"\x01{}", &[], &big]));
        let mut r = out.as_slice();
        assert_eq!(read_message(&mut r).unwrap(), b"\x01{}");
        assert_eq!(read_message(&mut r).unwrap(), b"");
        assert_eq!(read_message(&mut r).unwrap(), big);
        assert!(matches!(read_message(&mut r), Err(MessageError::Closed)));
    }

    #[test]
    fn reads_a_byte_at_a_time_through_interrupts() {
        let mut r = Trickle {
            bytes: stream(&[b"abc", b"de"]),
            at: 0,
            interrupt: false,
        };
        assert_eq!(read_message(&mut r).unwrap(), b"abc");
        assert_eq!(read_message(&mut r).unwrap(), b"de");
        assert!(matches!(read_message(&mut r), Err(MessageError::Closed)));
    }

    #[test]
    fn a_hostile_length_is_an_error_not_an_allocation() {
        for len in [MAX_MESSAGE as u32 + 1, u32::MAX] {
            // No body follows: the reader must refuse before reading one.
            let bytes = len.to_le_bytes();
            let e = read_message(&mut &bytes[..]).unwrap_err();
            assert!(
                matches!(e, MessageError::TooLong { len: l } if l == len as usize),
                "{e}"
            );
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        }
    }

    #[test]
    fn a_truncated_message_is_an_error() {
        let whole = stream(&[b"hello"]);
        for cut in 1..whole.len() {
            let e = read_message(&mut &whole[..cut]).unwrap_err();
            assert!(matches!(e, MessageError::Truncated), "cut at {cut}: {e}");
            assert_eq!(io::Error::from(e).kind(), io::ErrorKind::UnexpectedEof);
        }
    }

    #[test]
    fn the_writer_refuses_too_long_and_writes_nothing() {
        let mut out = Vec::new();
        let e = write_message(&mut out, &vec![0; MAX_MESSAGE + 1]).unwrap_err();
        assert!(matches!(e, MessageError::TooLong { len } if len == MAX_MESSAGE + 1));
        assert!(out.is_empty());
    }

    #[test]
    fn io_errors_keep_their_kind() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::TimedOut.into())
            }
        }
        let e = read_message(&mut Broken).unwrap_err();
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::TimedOut);
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_reads_what_it_writes() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let big = vec![3u8; MAX_MESSAGE];
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            write_message_async(&mut a, b"\x00frame").await.unwrap();
            write_message_async(&mut a, &sent).await.unwrap();
            let e = write_message_async(&mut a, &vec![0; MAX_MESSAGE + 1]).await;
            assert!(matches!(e, Err(MessageError::TooLong { .. })));
        });
        assert_eq!(read_message_async(&mut b).await.unwrap(), b"\x00frame");
        assert_eq!(read_message_async(&mut b).await.unwrap(), big);
        writer.await.unwrap();
        let end = read_message_async(&mut b).await;
        assert!(matches!(end, Err(MessageError::Closed)), "{end:?}");
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_refuses_hostile_and_truncated() {
        let hostile = u32::MAX.to_le_bytes();
        let e = read_message_async(&mut &hostile[..]).await.unwrap_err();
        assert!(matches!(e, MessageError::TooLong { .. }), "{e}");
        let whole = stream(&[b"hello"]);
        for cut in 1..whole.len() {
            let e = read_message_async(&mut &whole[..cut]).await.unwrap_err();
            assert!(matches!(e, MessageError::Truncated), "cut at {cut}: {e}");
        }
    }
}
