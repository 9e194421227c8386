//! [`Bearer`]: an access token's `Authorization` header, in one copy per
//! thread slot.
//!
//! Cloning a [`HeaderValue`] increments a reference count. With one header
//! shared by every thread, every request on every core writes to the same
//! count, and requests stop scaling across cores (`SetRequestHeader` with a
//! fixed value gains nothing from a second thread). A token keeps [`SLOTS`]
//! copies of its header instead, each with its count on cache lines of its
//! own, and each thread clones the copy of its slot: threads are given slots
//! in turn, so up to [`SLOTS`] threads share no count. The copies are wiped
//! when the token's last request is done with them.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::HeaderValue;
use zeroize::Zeroizing;

/// Copies per token: more threads than this share copies, in turn.
pub(crate) const SLOTS: usize = 16;

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's slot; [`SLOTS`] until it first sends a request.
    static SLOT: Cell<usize> = const { Cell::new(SLOTS) };
}

/// `Bearer <access token>`, sensitive, in [`SLOTS`] copies.
pub(crate) struct Bearer {
    copies: [HeaderValue; SLOTS],
}

impl Bearer {
    /// The header for `access_token`; `None` if it is not a valid header value.
    pub(crate) fn new(access_token: &str) -> Option<Self> {
        let text = Zeroizing::new([b"Bearer ", access_token.as_bytes()].concat());
        let copies: Vec<HeaderValue> = (0..SLOTS).map(|_| copy(&text)).collect::<Option<_>>()?;
        Some(Self {
            copies: copies.try_into().ok()?,
        })
    }

    /// This thread's copy.
    #[inline]
    pub(crate) fn get(&self) -> &HeaderValue {
        &self.copies[slot()]
    }
}

/// One copy's bytes, aligned so that the allocation holding them and their
/// reference count ([`Bytes::from_owner`]) spans whole cache-line pairs of
/// its own; wiped when the last clone is dropped.
#[repr(align(128))]
struct Wiped(Zeroizing<Box<[u8]>>);

impl AsRef<[u8]> for Wiped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn copy(text: &[u8]) -> Option<HeaderValue> {
    let bytes = Bytes::from_owner(Wiped(Zeroizing::new(Box::from(text))));
    let mut value = HeaderValue::from_maybe_shared(bytes).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// This thread's slot, below [`SLOTS`].
#[inline]
fn slot() -> usize {
    let assigned = SLOT.try_with(|slot| match slot.get() {
        assigned if assigned < SLOTS => assigned,
        _ => assign(slot, &NEXT_SLOT),
    });
    // A thread-local without a destructor is never gone; 0 would do if it were.
    assigned.unwrap_or(0)
}

#[cold]
fn assign(slot: &Cell<usize>, next: &AtomicUsize) -> usize {
    let assigned = next.fetch_add(1, Ordering::Relaxed) % SLOTS;
    slot.set(assigned);
    assigned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(header: &HeaderValue) -> usize {
        header.as_bytes().as_ptr() as usize
    }

    #[test]
    fn every_copy_is_the_sensitive_header_in_its_own_allocation() {
        let bearer = Bearer::new("at-1").unwrap();
        let mut addresses: Vec<usize> = bearer.copies.iter().map(address).collect();
        for copy in &bearer.copies {
            assert_eq!(copy, "Bearer at-1");
            assert!(copy.is_sensitive());
        }
        addresses.sort_unstable();
        addresses.dedup();
        assert_eq!(addresses.len(), SLOTS);
    }

    #[test]
    fn a_thread_clones_the_copy_of_its_slot_every_time() {
        let bearer = Bearer::new("at-1").unwrap();
        let first = address(bearer.get());
        let clone = bearer.get().clone();
        assert_eq!(address(&clone), first);
        assert_eq!(address(bearer.get()), first);
        assert_eq!(first, address(&bearer.copies[slot()]));
        let elsewhere = std::thread::scope(|scope| {
            let other = scope.spawn(|| address(bearer.get()));
            other.join().unwrap()
        });
        assert!(bearer.copies.iter().any(|copy| address(copy) == elsewhere));
    }

    #[test]
    fn a_thread_clones_the_copy_of_the_slot_it_was_given() {
        let bearer = Bearer::new("at-1").unwrap();
        std::thread::scope(|scope| {
            for given in 0..SLOTS {
                let bearer = &bearer;
                let thread = scope.spawn(move || {
                    assert_eq!(SLOT.with(Cell::get), SLOTS, "not given yet");
                    SLOT.with(|slot| slot.set(given));
                    address(bearer.get())
                });
                assert_eq!(thread.join().unwrap(), address(&bearer.copies[given]));
            }
        });
    }

    #[test]
    fn threads_are_given_slots_in_turn() {
        let next = AtomicUsize::new(0);
        let given: Vec<usize> = (0..SLOTS + 2)
            .map(|_| {
                let slot = Cell::new(SLOTS);
                let given = assign(&slot, &next);
                assert_eq!(slot.get(), given);
                given
            })
            .collect();
        let expected: Vec<usize> = (0..SLOTS).chain([0, 1]).collect();
        assert_eq!(given, expected);
    }

    #[test]
    fn invalid_tokens_make_no_header() {
        assert!(Bearer::new("line\nbreak").is_none());
        assert!(Bearer::new("nul\0").is_none());
    }
}
