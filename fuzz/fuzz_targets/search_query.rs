//! `q` of `/api/search`: any text parses (or is refused as too long) quickly, never a
//! panic or a loop; every term has words of letters and digits only (what the backends'
//! query languages are built from), and the reference matcher agrees with itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark::search::TextQuery;

fuzz_target!(|q: &str| {
    if let Ok(Some(query)) = TextQuery::parse(q) {
        for term in &query.terms {
            assert!(!term.words.is_empty());
            assert!(term.words.iter().all(|w| !w.is_empty() && w.chars().all(char::is_alphanumeric)));
        }
        let _ = query.matches(q);
    }
});
