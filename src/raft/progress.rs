//! The leader's view of one follower's replication.
