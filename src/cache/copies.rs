//! Each thread's own copy of the current `Authorization` header.
//!
//! Cloning a [`HeaderValue`] increments a reference count. With one header
//! shared by every thread, every request on every core writes to the same
//! count, and requests stop scaling across cores (`SetRequestHeader` with a
//! fixed value gains nothing from a second thread). A thread clones its own
//! copy instead, made once per token. A thread keeps one copy per cache it
//! uses, found by a linear scan: made for the one or few layers a process has.
//! Its copies of a dropped cache's token go at its next request.

use std::cell::RefCell;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};

thread_local! {
    static COPIES: RefCell<Copies> = const {
        RefCell::new(Copies {
            dropped: 0,
            list: Vec::new(),
        })
    };
}

/// A thread's copies, as of the `dropped`-th dropped cache.
struct Copies {
    dropped: u64,
    list: Vec<Copy>,
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
        let dropped = super::ticket::dropped();
        let header = match copies
            .list
            .iter()
            .find(|copy| copy.cache == cache && copy.generation == generation)
        {
            Some(copy) if copies.dropped == dropped => copy.header.clone(),
            _ => update(&mut copies, cache, generation, shared, dropped),
        };
        headers.insert(AUTHORIZATION, header);
        true
    });
    if inserted != Ok(true) {
        // The thread is exiting: share the cache's header.
        headers.insert(AUTHORIZATION, shared.clone());
    }
}

/// Drops this thread's copies of replaced tokens and of caches that are gone,
/// then returns its copy of this token, made now if it has none.
#[cold]
fn update(
    copies: &mut Copies,
    cache: u64,
    generation: u64,
    shared: &HeaderValue,
    dropped: u64,
) -> HeaderValue {
    let live = super::ticket::caches();
    copies.list.retain(|copy| {
        live.contains_key(&copy.cache) && (copy.cache != cache || copy.generation == generation)
    });
    drop(live);
    copies.dropped = dropped;
    if let Some(copy) = copies.list.iter().find(|copy| copy.cache == cache) {
        return copy.header.clone();
    }
    let Ok(mut copy) = HeaderValue::from_bytes(shared.as_bytes()) else {
        return shared.clone();
    };
    copy.set_sensitive(true);
    copies.list.push(Copy {
        cache,
        generation,
        header: copy.clone(),
    });
    copy
}

/// This thread's copies: cache and generation.
#[cfg(test)]
pub(super) fn held() -> Vec<(u64, u64)> {
    COPIES.with_borrow(|copies| {
        let list = copies.list.iter();
        list.map(|copy| (copy.cache, copy.generation)).collect()
    })
}
