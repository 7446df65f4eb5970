//! Counters counted on every request, registered once per thread.
//!
//! `metrics::counter!` looks its series up on every call: it builds a key
//! from the name and labels, hashes it and searches the recorder's
//! registry (about 2,000 instructions for the few counters of one request,
//! measured with callgrind; docs/benchmarks.md). Here each thread keeps the
//! handles it has used, keyed by the (static) name and label values.
//!
//! A handle taken before the process installs its recorder counts nothing,
//! and would stay so on that thread: the app installs the recorder before
//! it starts anything that counts.

use std::cell::RefCell;
use std::collections::HashMap;

type Key = (&'static str, [(&'static str, &'static str); 2]);

thread_local! {
    static COUNTERS: RefCell<HashMap<Key, metrics::Counter>> = RefCell::new(HashMap::new());
}

/// Adds one to the counter `name` with up to two `labels`.
pub fn increment(name: &'static str, labels: &[(&'static str, &'static str)]) {
    let mut pairs = [("", ""); 2];
    for (slot, label) in pairs.iter_mut().zip(labels) {
        *slot = *label;
    }
    COUNTERS.with_borrow_mut(|counters| {
        counters
            .entry((name, pairs))
            .or_insert_with(|| {
                let labels: Vec<metrics::Label> =
                    labels.iter().map(|(key, value)| metrics::Label::new(*key, *value)).collect();
                metrics::counter!(name, labels)
            })
            .increment(1);
    });
}
