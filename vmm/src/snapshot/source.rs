//! Where a snapshot reads guest memory from.
//!
//! Guest memory is the memory file plus the pages written since the last
//! flush, which are private copies in the guest's mapping (see
//! [`crate::spec::memory`]). A snapshot used to flush those pages into the
//! file first, then copy the file; a [`MemorySource`] reads them where they
//! are instead, so a snapshot copies each byte once, from memory straight
//! to the disk. With the file mapped, no byte is copied by the CPU at all:
//! the layer writer hands these mappings to `O_DIRECT` writes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::files::data_runs;
use crate::vstate::memory::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// Guest memory as a snapshot writes it: the memory file, with some runs
/// of pages read from elsewhere (the guest's newer private copies).
pub struct MemorySource<'a> {
    file: &'a File,
    /// The whole file, mapped: its bytes are read in place.
    view: Option<&'a [u8]>,
    /// Runs newer than the file: (file offset, bytes), page-aligned,
    /// sorted, not overlapping.
    overlay: Vec<(u64, &'a [u8])>,
}

/// A contiguous part of a range that [`MemorySource::parts`] splits.
#[derive(Debug, PartialEq, Eq)]
pub enum Part<'a> {
    /// Bytes in memory, to read in place.
    Mapped(&'a [u8]),
    /// Bytes to read from the file, at this offset.
    File(u64, usize),
}

impl<'a> MemorySource<'a> {
    /// A source that reads everything from `file`.
    pub fn file(file: &'a File) -> Self {
        Self {
            file,
            view: None,
            overlay: Vec::new(),
        }
    }

    /// A source over `file`, which `view` maps whole, where the `overlay`
    /// runs ((file offset, bytes), page-aligned, sorted, not overlapping)
    /// replace the file's bytes. Panics on an overlay that breaks those
    /// rules: the caller builds it from its own sorted page list.
    pub fn with_overlay(file: &'a File, view: &'a [u8], overlay: Vec<(u64, &'a [u8])>) -> Self {
        let mut end = 0;
        for &(off, b) in &overlay {
            assert!(
                off >= end && off.is_multiple_of(PAGE) && (b.len() as u64).is_multiple_of(PAGE),
                "overlay runs must be sorted, page-aligned and apart"
            );
            end = off + b.len() as u64;
        }
        assert!(end <= view.len() as u64, "an overlay run past the file");
        Self {
            file,
            view: Some(view),
            overlay,
        }
    }

    /// Where the first `len` bytes hold data: the file's data runs and the
    /// overlay's, in whole pages, sorted and merged.
    pub fn extents(&self, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let mut runs = data_runs(self.file, len)?;
        runs.extend(
            self.overlay
                .iter()
                .filter(|(off, _)| *off < len)
                .map(|&(off, b)| (off, (b.len() as u64).min(len - off))),
        );
        runs.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (s, n) in runs {
            let (start, end) = (s / PAGE * PAGE, ((s + n).div_ceil(PAGE) * PAGE).min(len));
            match out.last_mut() {
                Some((ps, pn)) if *ps + *pn >= start => *pn = end.max(*ps + *pn) - *ps,
                _ => out.push((start, end - start)),
            }
        }
        Ok(out)
    }

    /// Calls `f` with the parts of the `n` bytes at `off`, in order: each
    /// overlay run's bytes, and between them the file's, mapped if the
    /// file is.
    pub fn parts(&self, off: u64, n: usize, mut f: impl FnMut(Part<'a>)) {
        let end = off + n as u64;
        let mut pos = off;
        // The first run that ends after `off`.
        let mut i = self
            .overlay
            .partition_point(|&(o, b)| o + b.len() as u64 <= off);
        while pos < end {
            let next = self.overlay.get(i).copied();
            match next {
                Some((o, b)) if o <= pos => {
                    let stop = (o + b.len() as u64).min(end);
                    f(Part::Mapped(&b[(pos - o) as usize..(stop - o) as usize]));
                    pos = stop;
                    i += 1;
                }
                _ => {
                    let stop = next.map_or(end, |(o, _)| o.min(end));
                    f(self.file_part(pos, (stop - pos) as usize));
                    pos = stop;
                }
            }
        }
    }

    fn file_part(&self, off: u64, n: usize) -> Part<'a> {
        match self.view {
            Some(v) => Part::Mapped(&v[off as usize..off as usize + n]),
            None => Part::File(off, n),
        }
    }

    /// Reads the `buf.len()` bytes at `off` into `buf`.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut at = 0;
        let mut r = Ok(());
        self.parts(off, buf.len(), |p| {
            let n = match p {
                Part::Mapped(b) => {
                    buf[at..at + b.len()].copy_from_slice(b);
                    b.len()
                }
                Part::File(o, n) => {
                    if r.is_ok() {
                        r = self.file.read_exact_at(&mut buf[at..at + n], o);
                    }
                    n
                }
            };
            at += n;
        });
        r
    }

    /// The `n` bytes at `off` in place, if they lie in one mapping.
    pub fn mapped(&self, off: u64, n: usize) -> Option<&'a [u8]> {
        let mut one = None;
        let mut parts = 0;
        self.parts(off, n, |p| {
            parts += 1;
            one = match p {
                Part::Mapped(b) => Some(b),
                Part::File(..) => None,
            };
        });
        one.filter(|_| parts == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> File {
        let f = memfd();
        f.write_all_at(bytes, 0).unwrap();
        f
    }

    /// An anonymous memory file, as guest memory's is.
    fn memfd() -> File {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a valid name; no memory is touched.
        let fd = unsafe { libc::memfd_create(c"specvm-source-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just returned by memfd_create, and nothing else
        // owns it.
        unsafe { File::from_raw_fd(fd) }
    }

    /// Four pages of the file, filled with 1, 2, 3, 4; an overlay of
    /// pages 1 and 3 filled with 0xa1 and 0xa3.
    fn four_pages() -> (File, Vec<u8>, Vec<u8>, Vec<u8>) {
        let file: Vec<u8> = (1..=4u8).flat_map(|b| vec![b; PAGE_SIZE]).collect();
        (
            file_with(&file),
            file,
            vec![0xa1; PAGE_SIZE],
            vec![0xa3; PAGE_SIZE],
        )
    }

    #[test]
    fn overlay_pages_replace_the_files_pages() {
        let (f, view, p1, p3) = four_pages();
        let s = MemorySource::with_overlay(&f, &view, vec![(PAGE, &p1), (3 * PAGE, &p3)]);
        let mut got = vec![0u8; 4 * PAGE_SIZE];
        s.read_exact_at(&mut got, 0).unwrap();
        let want: Vec<u8> = [1u8, 0xa1, 3, 0xa3]
            .iter()
            .flat_map(|&b| vec![b; PAGE_SIZE])
            .collect();
        assert_eq!(got, want);
        // A read that starts and ends inside pages.
        let mut part = vec![0u8; PAGE_SIZE];
        s.read_exact_at(&mut part, PAGE + 100).unwrap();
        assert_eq!(&part[..], &want[PAGE_SIZE + 100..2 * PAGE_SIZE + 100]);
        // The same through the file alone, without a view.
        let plain = MemorySource::file(&f);
        plain.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, view);
    }

    #[test]
    fn mapped_only_within_one_mapping() {
        let (f, view, p1, p3) = four_pages();
        let s = MemorySource::with_overlay(&f, &view, vec![(PAGE, &p1), (3 * PAGE, &p3)]);
        assert_eq!(s.mapped(PAGE, PAGE_SIZE), Some(&p1[..]));
        assert_eq!(
            s.mapped(2 * PAGE, PAGE_SIZE),
            Some(&view[2 * PAGE_SIZE..3 * PAGE_SIZE])
        );
        assert_eq!(s.mapped(PAGE, 2 * PAGE_SIZE), None);
        assert_eq!(MemorySource::file(&f).mapped(0, PAGE_SIZE), None);
    }

    #[test]
    fn extents_join_file_data_and_overlay() {
        // A sparse file: data in page 0 only; an overlay at pages 1 and 5.
        let f = memfd();
        f.set_len(8 * PAGE).unwrap();
        f.write_all_at(&[7u8; PAGE_SIZE], 0).unwrap();
        let view = vec![0u8; 8 * PAGE_SIZE];
        let (a, b) = (vec![1u8; PAGE_SIZE], vec![2u8; PAGE_SIZE]);
        let s = MemorySource::with_overlay(&f, &view, vec![(PAGE, &a), (5 * PAGE, &b)]);
        let got = s.extents(8 * PAGE).unwrap();
        // A file system may report more data than was written (whole
        // blocks), never less: page 0 and the overlay pages must be there.
        for want in [0, 1, 5] {
            assert!(
                got.iter()
                    .any(|&(o, n)| o <= want * PAGE && (want + 1) * PAGE <= o + n),
                "page {want} missing from {got:?}"
            );
        }
        for w in got.windows(2) {
            assert!(w[0].0 + w[0].1 < w[1].0, "not merged: {got:?}");
        }
    }

    #[test]
    #[should_panic(expected = "sorted")]
    fn an_unsorted_overlay_is_refused() {
        let (f, view, p1, p3) = four_pages();
        let _ = MemorySource::with_overlay(&f, &view, vec![(3 * PAGE, &p3), (PAGE, &p1)]);
    }
}
