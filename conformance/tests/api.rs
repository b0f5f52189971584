//! `docs/api.md` as a shop or operator integration meets it: what a command to a device that
//! does not exist, or to a door a cabinet does not have, is answered.

#![allow(clippy::unwrap_used)]

use conformance::stack::Stack;
use serde_json::json;
use testkit::http::call;

#[tokio::test]
async fn commands_name_a_registered_device_and_one_of_its_doors() {
    let stack = Stack::start(|_| {}).await;
    stack.register_cabinet("CAB-CMD").await;
    let api = stack.api();
    let query = |door: u8| Some(json!({"action": "query_door", "door_id": door}));

    let (code, body) = call(api, "POST", "/v1/devices/cab:CAB-NONE/commands", query(1)).await;
    assert_eq!((code, body["error"].as_str()), (404, Some("not_found")), "{body}");
    let (code, body) = call(api, "POST", "/v1/devices/cab:CAB-CMD/commands", query(9)).await;
    assert_eq!((code, body["field"].as_str()), (400, Some("door_id")), "{body}");
    // Registered, door known, not connected: answered at once.
    let (code, body) = call(api, "POST", "/v1/devices/cab:CAB-CMD/commands", query(1)).await;
    assert_eq!((code, body["outcome"].as_str()), (200, Some("not_connected")), "{body}");
}
