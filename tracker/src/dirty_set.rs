//! The output of a collect: the dirty page numbers and, per [`Capture`], one captured page
//! each (XOR delta or previous content) for the engine's encoder.
//!
//! Layout and why: a set is a list of *segments*, one per unit of parallel work. Each scan
//! worker appends to its own segment, so workers never share a buffer and nothing is merged or
//! copied after the scan. Within a segment page numbers ascend; the segments a collect produces
//! cover ascending, disjoint ranges, so iterating the whole set yields ascending page numbers.
//! A [`crate::ReplicaAudit`] appends its repairs as one more segment (also ascending, and
//! disjoint from the collect's pages because those were just synchronised).
//!
//! Buffers keep their capacity across epochs ([`DirtySet::clear`]) so a steady-state collect
//! allocates nothing inside the VM's stop window.

use crate::page::{Capture, Pfn, PAGE_SIZE};

/// One worker's share of a collect.
#[derive(Debug, Default)]
pub(crate) struct Segment {
    /// Ascending dirty page numbers.
    pub(crate) pfns: Vec<Pfn>,
    /// `PAGE_SIZE` bytes per entry of `pfns` when the set captures pages, else empty.
    pub(crate) pages: Vec<u8>,
}

impl Segment {
    fn clear(&mut self) {
        self.pfns.clear();
        self.pages.clear();
    }
}

/// Dirty pages found by one collect (plus audit repairs), with their captured pages.
#[derive(Debug)]
pub struct DirtySet {
    /// What each entry carries besides its number; fixed for the set's life so the engine's
    /// encoder knows what it reads.
    capture: Capture,
    /// Per-worker segments; `used` of them hold this epoch's entries, the rest are spare
    /// buffers kept for their capacity.
    segments: Vec<Segment>,
    /// Number of segments in use this epoch.
    used: usize,
}

/// One dirty page as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyPage<'a> {
    /// The page's number within the RAM file.
    pub pfn: Pfn,
    /// `PAGE_SIZE` bytes: the XOR delta or old content per the set's [`Capture`]; `None` for
    /// [`Capture::PfnsOnly`].
    pub captured: Option<&'a [u8]>,
}

impl DirtySet {
    /// An empty set that captures `capture` for every dirty page.
    pub fn new(capture: Capture) -> Self {
        DirtySet {
            capture,
            segments: Vec::new(),
            used: 0,
        }
    }

    /// What this set captures per page.
    pub fn capture(&self) -> Capture {
        self.capture
    }

    /// Forgets all entries, keeping the buffers' capacity for the next epoch.
    pub fn clear(&mut self) {
        for seg in &mut self.segments[..self.used] {
            seg.clear();
        }
        self.used = 0;
    }

    /// Number of dirty pages.
    pub fn len(&self) -> usize {
        self.used_segments().iter().map(|s| s.pfns.len()).sum()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.used_segments().iter().all(|s| s.pfns.is_empty())
    }

    /// Dirty page numbers, ascending within each segment (see the module doc).
    pub fn pfns(&self) -> impl Iterator<Item = Pfn> + '_ {
        self.used_segments()
            .iter()
            .flat_map(|s| s.pfns.iter().copied())
    }

    /// Dirty pages with their captured bytes.
    pub fn iter(&self) -> impl Iterator<Item = DirtyPage<'_>> + '_ {
        let capturing = self.capture != Capture::PfnsOnly;
        self.used_segments().iter().flat_map(move |s| {
            s.pfns.iter().enumerate().map(move |(i, &pfn)| DirtyPage {
                pfn,
                captured: capturing.then(|| &s.pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]),
            })
        })
    }

    /// Bytes held by captured pages.
    pub fn captured_bytes(&self) -> usize {
        self.used_segments().iter().map(|s| s.pages.len()).sum()
    }

    fn used_segments(&self) -> &[Segment] {
        &self.segments[..self.used]
    }

    /// Appends `n` empty segments for this epoch's workers and returns them.
    pub(crate) fn add_segments(&mut self, n: usize) -> &mut [Segment] {
        let start = self.used;
        let end = start + n;
        if self.segments.len() < end {
            self.segments.resize_with(end, Segment::default);
        }
        for seg in &mut self.segments[start..end] {
            seg.clear();
        }
        self.used = end;
        &mut self.segments[start..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_iterate_in_order_and_clear_keeps_capacity() {
        let mut set = DirtySet::new(Capture::OldPage);
        {
            let segs = set.add_segments(2);
            segs[0].pfns.extend([1, 5]);
            segs[0].pages.resize(2 * PAGE_SIZE, 1);
            segs[1].pfns.push(9);
            segs[1].pages.resize(PAGE_SIZE, 2);
        }
        assert_eq!(set.len(), 3);
        assert_eq!(set.pfns().collect::<Vec<_>>(), vec![1, 5, 9]);
        let pages: Vec<_> = set.iter().collect();
        assert_eq!(pages[2].pfn, 9);
        assert_eq!(pages[2].captured.unwrap()[0], 2);
        assert_eq!(set.captured_bytes(), 3 * PAGE_SIZE);

        let cap = set.segments[0].pages.capacity();
        set.clear();
        assert!(set.is_empty());
        assert_eq!(set.len(), 0);
        assert!(set.segments[0].pages.capacity() >= cap);

        // Reuse: a new epoch's segment starts empty.
        set.add_segments(1)[0].pfns.push(3);
        assert_eq!(set.pfns().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn pfns_only_has_no_captured_bytes() {
        let mut set = DirtySet::new(Capture::PfnsOnly);
        set.add_segments(1)[0].pfns.push(7);
        let page = set.iter().next().unwrap();
        assert_eq!(
            page,
            DirtyPage {
                pfn: 7,
                captured: None
            }
        );
    }
}
