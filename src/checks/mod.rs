//! What a check is and how its result is judged: the specification a pack yields
//! ([`spec`]), the expectation grammar ([`expectation`]), exact numbers ([`number`]), an
//! incremental check's running count ([`incremental`]) and the evaluation of a query's rows into
//! pass, fail or error ([`outcome`]). Pure: no I/O, no clock.

pub mod expectation;
pub mod incremental;
pub mod number;
pub mod outcome;
pub(crate) mod spec;
