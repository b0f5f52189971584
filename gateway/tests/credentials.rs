//! Credential changes on a node: a login that verified just before a rotation and registered
//! just after it must not keep a session; an unchanged credential costs nothing to re-check.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::Env;
use protocol::bus::{CredentialChange, CredentialChangeKind, DeviceKey};
use protocol::cabinet::LoginStatus;

#[tokio::test]
async fn a_login_checked_before_a_rotation_is_checked_again() {
    let env = Env::single().await;
    let gw = env.start("gw-a").await;
    let (id, _) = env.provision_cabinet("CAB-RACE").await;
    let device = DeviceKey::Cabinet(id.clone());
    let credentials = &gw.ctx.credentials;

    // What a login reads before its check.
    let changes = credentials.changes();
    let gateway::credentials::Lookup::Found(verified) = credentials.lookup(&device).await else {
        panic!("provisioned")
    };
    assert!(credentials.still_valid(&device, changes, &verified).await, "nothing changed");

    // A change to another device is applied meanwhile: re-checked, and still valid.
    let other =
        CredentialChange { device: DeviceKey::parse("cab:CAB-OTHER").unwrap(), kind: CredentialChangeKind::Rotated };
    gateway::credential_watch::apply(&gw.ctx, &other);
    assert!(credentials.still_valid(&device, changes, &verified).await, "the device's credential is unchanged");

    // This device's secret is rotated and the change applied: the login no longer holds.
    let (_, new_secret) = env.provision_cabinet("CAB-RACE").await;
    gateway::credential_watch::apply(
        &gw.ctx,
        &CredentialChange { device: device.clone(), kind: CredentialChangeKind::Rotated },
    );
    assert!(!credentials.still_valid(&device, changes, &verified).await, "rotated while the login was checked");
    let (_, result) = common::Cabinet::login(gw.addresses.cabinet.unwrap(), &id, &new_secret).await;
    assert_eq!(result.status, LoginStatus::Accepted, "the new secret works");
}
