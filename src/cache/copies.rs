//! Each thread's own copy of the current `Authorization` header.
//!
//! Cloning a [`HeaderValue`] increments a reference count. With one header
//! shared by every thread, every request on every core writes to the same
//! count, and requests stop scaling across cores (`SetRequestHeader` with a
//! fixed value gains nothing from a second thread). A thread clones its own
//! copy instead, made once per token. A thread keeps one copy per cache it
//! uses, found by a linear scan: made for the one or few layers a process has.

use std::cell::RefCell;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};

thread_local! {
    static COPIES: RefCell<Vec<Copy>> = const { RefCell::new(Vec::new()) };
}

/// A thread's copy of one cache's header.
struct Copy {
    cache: u64,
    generation: u64,
    header: HeaderValue,
}

/// Puts `shared`, the header of token `generation` of cache `cache`, in
/// `headers`: a clone of this thread's copy, made now if the thread has none.
#[inline(always)]
pub(super) fn insert(headers: &mut HeaderMap, cache: u64, generation: u64, shared: &HeaderValue) {
    let inserted = COPIES.try_with(|copies| {
        let Ok(mut copies) = copies.try_borrow_mut() else {
            return false;
        };
        let header = match copies
            .iter()
            .find(|copy| copy.cache == cache && copy.generation == generation)
        {
            Some(copy) => copy.header.clone(),
            None => replace(&mut copies, cache, generation, shared),
        };
        headers.insert(AUTHORIZATION, header);
        true
    });
    if inserted != Ok(true) {
        // The thread is exiting: share the cache's header.
        headers.insert(AUTHORIZATION, shared.clone());
    }
}

/// Makes this thread's copy of a new token, dropping the copy of the token it
/// replaces and those of caches that are gone.
#[cold]
fn replace(
    copies: &mut Vec<Copy>,
    cache: u64,
    generation: u64,
    shared: &HeaderValue,
) -> HeaderValue {
    let live = super::ticket::caches();
    copies.retain(|copy| copy.cache != cache && live.contains_key(&copy.cache));
    drop(live);
    let Ok(mut copy) = HeaderValue::from_bytes(shared.as_bytes()) else {
        return shared.clone();
    };
    copy.set_sensitive(true);
    copies.push(Copy {
        cache,
        generation,
        header: copy.clone(),
    });
    copy
}

/// This thread's copies: cache and generation.
#[cfg(test)]
pub(super) fn held() -> Vec<(u64, u64)> {
    COPIES.with_borrow(|copies| copies.iter().map(|c| (c.cache, c.generation)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header `insert` puts in an empty map.
    fn inserted(cache: u64, generation: u64, shared: &HeaderValue) -> HeaderValue {
        let mut headers = HeaderMap::new();
        insert(&mut headers, cache, generation, shared);
        headers.remove(AUTHORIZATION).unwrap()
    }

    #[test]
    fn a_thread_clones_its_own_copy_until_the_token_changes() {
        let shared = HeaderValue::from_static("Bearer at-1");
        let first = inserted(u64::MAX, 1, &shared);
        assert_eq!(first, shared);
        assert!(first.is_sensitive());
        // Same bytes, another allocation: not the shared header's.
        assert_ne!(first.as_bytes().as_ptr(), shared.as_bytes().as_ptr());
        let again = inserted(u64::MAX, 1, &shared);
        assert_eq!(again.as_bytes().as_ptr(), first.as_bytes().as_ptr());

        let other = std::thread::spawn({
            let shared = shared.clone();
            move || inserted(u64::MAX, 1, &shared).as_bytes().as_ptr() as usize
        })
        .join()
        .unwrap();
        assert_ne!(other, first.as_bytes().as_ptr() as usize);

        let renewed = HeaderValue::from_static("Bearer at-2");
        assert_eq!(inserted(u64::MAX, 2, &renewed), renewed);
    }

    #[test]
    fn copies_of_replaced_tokens_and_of_caches_that_are_gone_are_dropped() {
        let shared = HeaderValue::from_static("Bearer at-1");
        // No cache with this id is registered: it counts as gone.
        inserted(u64::MAX - 1, 1, &shared);
        assert_eq!(held(), [(u64::MAX - 1, 1)]);
        inserted(u64::MAX, 1, &shared);
        assert_eq!(held(), [(u64::MAX, 1)]);
        inserted(u64::MAX, 2, &shared);
        assert_eq!(held(), [(u64::MAX, 2)]);
    }
}
