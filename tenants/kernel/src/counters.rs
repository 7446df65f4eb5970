//! Counters counted on every request, registered once per thread.
//!
//! `metrics::counter!` looks its series up on every call: it builds a key
//! from the name and labels, hashes it and searches the recorder's
//! registry (about 2,000 instructions for the few counters of one request,
//! measured with callgrind; docs/benchmarks.md). Here each thread keeps the
//! handles it has used, found by the (static) name and label values.
//!
//! A handle taken before the process installs its recorder counts nothing,
//! and would stay so on that thread: the app installs the recorder before
//! it starts anything that counts.

use std::cell::RefCell;

/// A series: its name and label values, all static.
type Key = (&'static str, [(&'static str, &'static str); 2]);

thread_local! {
    /// Few series (a dozen), so a list: comparing the strings' addresses
    /// costs less than hashing them.
    static COUNTERS: RefCell<Vec<(Key, metrics::Counter)>> = const { RefCell::new(Vec::new()) };
}

/// The same static string (a string can be equal without being the same,
/// which only costs a second handle to the same series).
fn same(a: &'static str, b: &'static str) -> bool {
    std::ptr::eq(a, b)
}

/// Adds one to the counter `name` with up to two `labels`.
pub fn increment(name: &'static str, labels: &[(&'static str, &'static str)]) {
    let mut pairs = [("", ""); 2];
    for (slot, label) in pairs.iter_mut().zip(labels) {
        *slot = *label;
    }
    COUNTERS.with_borrow_mut(|counters| {
        let found = counters.iter().position(|((n, p), _)| {
            same(n, name) && p.iter().zip(&pairs).all(|((k, v), (k2, v2))| same(k, k2) && same(v, v2))
        });
        let index = found.unwrap_or_else(|| {
            let labels: Vec<metrics::Label> =
                labels.iter().map(|(key, value)| metrics::Label::new(*key, *value)).collect();
            counters.push(((name, pairs), metrics::counter!(name, labels)));
            counters.len() - 1
        });
        counters[index].1.increment(1);
    });
}
