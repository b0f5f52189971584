//! Purchases: from a shopper's scan to the settlement (seed document 003, "购买流程").
//!
//! An order moves through an explicit state machine, every step one PostgreSQL transaction
//! that locks the row, checks the state it starts from and records the transition with its
//! cause, so that concurrent events (the cabinet's result, its door event, a timer on another
//! instance) can never both apply:
//!
//! ```text
//! created --authorised--> authorised --> door_opening --> door_open --> door_closed --> settled
//!    |  \--refused / not authorised in time--> cancelled      |             |
//!    |                          door failed / silent ---------+--> cancelled |
//!    |                                                                      +--> abnormal (review)
//! ```
//!
//! - [`orders`]: creating an order (checks, the door's lock), the payment callback, reading;
//! - [`lock`]: the door lock in Redis shared with restocks and price changes;
//! - [`driver`]: due times in PostgreSQL, claimed by one instance (`FOR UPDATE SKIP LOCKED`),
//!   so that the delayed cancellation, the door-opening retries and the settlement wait
//!   survive a restart; [`opening`]: opening the door with its queries;
//! - [`doors`]: door events from the cabinets; [`settlement`]: weights to money, written with
//!   its outbox message in one transaction; [`reckon`]: the money rules, pure;
//! - [`outbox`]: the relay to Redis streams (at least once, with idempotency keys, settlements
//!   until the account service confirms them);
//! - [`money`]: the settlement, refunds and extra charges as messages to the account service,
//!   and its answers (`paid`, `failed`): an order's `payment` (`pending`, `paid`, `unpaid`,
//!   `refunded`) after it settled; [`contracts`]: the password-free deduction contracts a
//!   purchase needs;
//! - [`admin`]: an operator cancels an order not yet opened or force-closes one whose door
//!   never reported closed;
//! - [`anomalies`]: what operators must look at (and inspection notices for a cabinet that
//!   raises many); [`restock`]: refills and restock orders; [`stocktake`]: the restocker's
//!   count, which finds an item swapped for one of the same weight (problem 3) and re-zeroes
//!   drifted scales.

pub mod admin;
pub mod anomalies;
pub mod contracts;
pub mod doors;
pub mod driver;
pub mod lists;
pub mod lock;
pub mod money;
pub mod opening;
pub mod orders;
pub mod outbox;
pub mod reckon;
pub mod restock;
pub mod settlement;
pub mod stocktake;

use serde::Serialize;
use tokio::sync::Notify;

/// An order's state (`orders.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for the payment provider's authorisation.
    Created,
    /// Authorised; the door is about to be opened.
    Authorised,
    /// The open command was sent; waiting for the cabinet.
    DoorOpening,
    /// The shopper has the door open.
    DoorOpen,
    /// The door closed; waiting for stable weights.
    DoorClosed,
    /// Charged (possibly nothing); final.
    Settled,
    /// Ended without a charge; final.
    Cancelled,
    /// Could not be settled automatically; an operator decides; final for the automation.
    Abnormal,
}

impl State {
    /// Every state, for gauges.
    pub const ALL: [State; 8] = [
        State::Created,
        State::Authorised,
        State::DoorOpening,
        State::DoorOpen,
        State::DoorClosed,
        State::Settled,
        State::Cancelled,
        State::Abnormal,
    ];

    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Authorised => "authorised",
            State::DoorOpening => "door_opening",
            State::DoorOpen => "door_open",
            State::DoorClosed => "door_closed",
            State::Settled => "settled",
            State::Cancelled => "cancelled",
            State::Abnormal => "abnormal",
        }
    }

    /// From the column value.
    pub fn parse(s: &str) -> Option<Self> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the order still runs (and holds its door's lock).
    pub fn is_active(self) -> bool {
        !matches!(self, State::Settled | State::Cancelled | State::Abnormal)
    }
}

/// Wake-ups shared by the purchase tasks of one instance (a new due order, a new outbox row),
/// so that they act at once instead of at their next poll.
#[derive(Debug, Default)]
pub struct Wakers {
    /// The driver: an order became due now.
    pub driver: Notify,
    /// The outbox relay: a message was written.
    pub relay: Notify,
}
