//! Money on the request path and around it: what a request may cost ([`pricing`]), the prepaid
//! [`wallet`] leases it is held and settled against, and Stripe top-ups ([`stripe`]) that fill
//! the wallets. Amounts are integer nano-USD ([`crate::money`]).

pub mod pricing;
pub mod stripe;
pub mod wallet;
