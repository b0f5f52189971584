//! The simulated fleet's identities and credentials, derived from a device number so that the
//! orchestrator and every worker process agree without passing secrets around.

use protocol::bus::{DeviceKey, Keys};
use protocol::{DeviceId, Vin};
use sha2::{Digest, Sha256};

/// Cabinet number `n`'s id.
pub fn cabinet_id(n: usize) -> DeviceId {
    DeviceId::new(format!("LT-CAB-{n:06}")).expect("generated ids are valid")
}

/// A cabinet's 32-byte secret.
pub fn cabinet_secret(id: &DeviceId) -> Vec<u8> {
    Sha256::digest(format!("iotgw-loadtest-cabinet:{id}")).to_vec()
}

/// Vehicle number `n`'s VIN (`LTV` and 14 digits: a valid VIN alphabet).
pub fn vin(n: usize) -> Vin {
    Vin::new(format!("LTV{n:014}")).expect("generated VINs are valid")
}

/// A vehicle's token.
pub fn vehicle_token(vin: &Vin) -> String {
    hex::encode(&Sha256::digest(format!("iotgw-loadtest-vehicle:{vin}"))[..16])
}

/// Writes the credentials of `cabinets` cabinets and `vehicles` vehicles where the gateways
/// read them (`P cred:*`), in pipelines of 1,000. Each command touches one key, so this works
/// on Redis Cluster too.
pub async fn provision_credentials(
    redis: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    cabinets: usize,
    vehicles: usize,
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    let mut n = 0;
    for i in 0..cabinets {
        let id = cabinet_id(i);
        let secret = hex::encode(cabinet_secret(&id));
        pipe.cmd("HSET")
            .arg(keys.credentials(&DeviceKey::Cabinet(id)))
            .arg("secret")
            .arg(secret)
            .arg("status")
            .arg("enabled")
            .ignore();
        n += 1;
        if n % 1000 == 0 {
            pipe.query_async::<()>(redis).await?;
            pipe = redis::pipe();
        }
    }
    for i in 0..vehicles {
        let vin = vin(i);
        let hash = hex::encode(Sha256::digest(vehicle_token(&vin).as_bytes()));
        pipe.cmd("HSET")
            .arg(keys.credentials(&DeviceKey::Vehicle(vin)))
            .arg("token_sha256")
            .arg(hash)
            .arg("status")
            .arg("enabled")
            .ignore();
        n += 1;
        if n % 1000 == 0 {
            pipe.query_async::<()>(redis).await?;
            pipe = redis::pipe();
        }
    }
    if n % 1000 != 0 {
        pipe.query_async::<()>(redis).await?;
    }
    Ok(())
}
