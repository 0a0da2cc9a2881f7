//! Where a snapshot reads guest memory from.
//!
//! Guest memory is the memory file plus the pages written since the last
//! flush, which are private copies in the guest's mapping (see
//! [`crate::spec::memory`]). A snapshot used to flush those pages into the
//! file first, then copy the file; a [`MemorySource`] reads guest memory
//! where the guest does, through its mapping, so a snapshot copies each
//! byte once, from memory straight to the disk, and the layer writer hands
//! the mapping itself to `O_DIRECT` writes: no copy by the CPU at all.
//!
//! Why the guest's mapping and not a view of the file, even for flushed
//! pages: the guest has touched its pages, so they are mapped, where a
//! view would take a page fault on every page it reads (a filled 1 GiB
//! snapshot spent ~150 ms more that way).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::files::data_runs;
use crate::vstate::memory::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// Guest memory as a snapshot writes it: bytes read in place from mappings
/// where there are some, else from the memory file; data where the file
/// has data, and where pages are newer than the file.
pub struct MemorySource<'a> {
    file: &'a File,
    /// Memory to read in place: (file offset, bytes), page-aligned, sorted,
    /// not overlapping.
    maps: Vec<(u64, &'a [u8])>,
    /// Runs of pages newer than the file: (file offset, length), sorted.
    newer: Vec<(u64, u64)>,
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
            maps: Vec::new(),
            newer: Vec::new(),
        }
    }

    /// A source over `file` whose bytes are read in place from `maps`
    /// ((file offset, bytes)) where they cover it, and that holds data
    /// also in the `newer` runs ((file offset, length)) where the file may
    /// have holes. Both must be page-aligned, sorted and apart; panics on
    /// ones that are not: the caller builds them from its own sorted lists.
    pub fn new(file: &'a File, maps: Vec<(u64, &'a [u8])>, newer: Vec<(u64, u64)>) -> Self {
        let mut end = 0;
        for &(off, b) in &maps {
            check_run(off, b.len() as u64, end);
            end = off + b.len() as u64;
        }
        let mut end = 0;
        for &(off, n) in &newer {
            check_run(off, n, end);
            end = off + n;
        }
        Self { file, maps, newer }
    }

    /// Where the first `len` bytes hold data: the file's data runs and the
    /// newer runs, in whole pages, sorted and merged.
    pub fn extents(&self, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let mut runs = data_runs(self.file, len)?;
        runs.extend(
            self.newer
                .iter()
                .filter(|(off, _)| *off < len)
                .map(|&(off, n)| (off, n.min(len - off))),
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

    /// Calls `f` with the parts of the `n` bytes at `off`, in order: the
    /// mappings' bytes, and between them the file's.
    pub fn parts(&self, off: u64, n: usize, mut f: impl FnMut(Part<'a>)) {
        let end = off + n as u64;
        let mut pos = off;
        // The first run that ends after `off`.
        let mut i = self
            .maps
            .partition_point(|&(o, b)| o + b.len() as u64 <= off);
        while pos < end {
            let next = self.maps.get(i).copied();
            match next {
                Some((o, b)) if o <= pos => {
                    let stop = (o + b.len() as u64).min(end);
                    f(Part::Mapped(&b[(pos - o) as usize..(stop - o) as usize]));
                    pos = stop;
                    i += 1;
                }
                _ => {
                    let stop = next.map_or(end, |(o, _)| o.min(end));
                    f(Part::File(pos, (stop - pos) as usize));
                    pos = stop;
                }
            }
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

/// Panics unless the run (off, n) is page-aligned, not empty, and starts
/// at or after `end`.
fn check_run(off: u64, n: u64, end: u64) {
    assert!(
        off >= end && n > 0 && off.is_multiple_of(PAGE) && n.is_multiple_of(PAGE),
        "runs must be sorted, page-aligned and apart"
    );
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

    /// Four pages of the file, filled with 1, 2, 3, 4; two mapped pages
    /// filled with 0xa1 and 0xa3.
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
    fn mapped_bytes_are_read_in_place_and_the_rest_from_the_file() {
        let (f, file, p1, p3) = four_pages();
        let s = MemorySource::new(&f, vec![(PAGE, &p1), (3 * PAGE, &p3)], Vec::new());
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
        // The file alone.
        MemorySource::file(&f).read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, file);
    }

    #[test]
    fn mapped_only_within_one_mapping() {
        let (f, _, p1, p3) = four_pages();
        let s = MemorySource::new(&f, vec![(PAGE, &p1), (3 * PAGE, &p3)], Vec::new());
        assert_eq!(s.mapped(PAGE, PAGE_SIZE), Some(&p1[..]));
        assert_eq!(s.mapped(PAGE + 8, 16), Some(&p1[8..24]));
        assert_eq!(s.mapped(2 * PAGE, PAGE_SIZE), None, "in the file");
        assert_eq!(s.mapped(PAGE, 2 * PAGE_SIZE), None, "two parts");
        assert_eq!(MemorySource::file(&f).mapped(0, PAGE_SIZE), None);
    }

    #[test]
    fn extents_join_file_data_and_newer_pages() {
        // A sparse file: data in page 0 only; newer pages 1 and 5.
        let f = memfd();
        f.set_len(8 * PAGE).unwrap();
        f.write_all_at(&[7u8; PAGE_SIZE], 0).unwrap();
        let s = MemorySource::new(&f, Vec::new(), vec![(PAGE, PAGE), (5 * PAGE, PAGE)]);
        assert_eq!(
            s.extents(8 * PAGE).unwrap(),
            vec![(0, 2 * PAGE), (5 * PAGE, PAGE)]
        );
        // Cut at the length asked for.
        assert_eq!(s.extents(2 * PAGE).unwrap(), vec![(0, 2 * PAGE)]);
    }

    #[test]
    #[should_panic(expected = "sorted")]
    fn unsorted_maps_are_refused() {
        let (f, _, p1, p3) = four_pages();
        let _ = MemorySource::new(&f, vec![(3 * PAGE, &p3), (PAGE, &p1)], Vec::new());
    }

    #[test]
    #[should_panic(expected = "page-aligned")]
    fn unaligned_newer_runs_are_refused() {
        let f = memfd();
        let _ = MemorySource::new(&f, Vec::new(), vec![(100, PAGE)]);
    }
}
