//! What a check is and how its result is judged: the specification a pack yields
//! ([`spec`]), the expectation grammar ([`expectation`]) and the evaluation of a query's rows
//! into pass, fail or error ([`outcome`]). Pure: no I/O, no clock.

pub mod expectation;
pub mod outcome;
pub mod spec;
