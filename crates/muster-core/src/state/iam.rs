//! Applying IAM commands.

use super::State;
use crate::command::IamCommand;
use crate::{AccessKey, KeyStatus, Outcome, Rejection, User};

/// AWS allows two access keys per user, so that one can be rotated.
const MAX_KEYS_PER_USER: usize = 2;

/// IAM user names: 1..64 of letters, digits and `+=,.@_-`.
fn user_name(field: &str, name: &str) -> Result<(), Rejection> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Rejection::new(
            field,
            format!("{field}: '{name}' must be 1 to 64 letters, digits or +=,.@_-"),
        ))
    }
}

impl State {
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }

    pub fn access_key(&self, id: &str) -> Option<&AccessKey> {
        self.access_keys.get(id)
    }

    pub fn access_keys_of<'a>(&'a self, user: &'a str) -> impl Iterator<Item = &'a AccessKey> + 'a {
        self.access_keys.values().filter(move |k| k.user == user)
    }

    fn existing_user(&self, name: &str) -> Result<&User, Rejection> {
        self.users.get(name).ok_or_else(|| {
            Rejection::new("UserName", format!("UserName: user {name} does not exist"))
        })
    }

    pub(super) fn check_iam(&self, cmd: &IamCommand) -> Result<(), Rejection> {
        match cmd {
            IamCommand::CreateUser { name, .. } => {
                user_name("UserName", name)?;
                if self.users.contains_key(name) {
                    return Err(Rejection::new(
                        "UserName",
                        format!("UserName: user {name} already exists"),
                    ));
                }
                Ok(())
            }
            IamCommand::DeleteUser { name } => {
                let user = self.existing_user(name)?;
                if self.access_keys_of(name).next().is_some() || !user.policies.is_empty() {
                    return Err(Rejection::new(
                        "UserName",
                        format!("UserName: delete the access keys and policies of {name} first"),
                    ));
                }
                Ok(())
            }
            IamCommand::CreateAccessKey { user, id, .. } => {
                self.existing_user(user)?;
                if self.access_keys_of(user).count() >= MAX_KEYS_PER_USER {
                    return Err(Rejection::new(
                        "UserName",
                        format!("UserName: {user} already has {MAX_KEYS_PER_USER} access keys"),
                    ));
                }
                if self.access_keys.contains_key(id) {
                    return Err(Rejection::new(
                        "AccessKeyId",
                        format!("AccessKeyId: {id} already exists"),
                    ));
                }
                Ok(())
            }
            IamCommand::DeleteAccessKey { user, id } => match self.access_keys.get(id) {
                Some(k) if k.user == *user => Ok(()),
                _ => Err(Rejection::new(
                    "AccessKeyId",
                    format!("AccessKeyId: {user} has no access key {id}"),
                )),
            },
            IamCommand::PutUserPolicy {
                user, policy_name, ..
            } => {
                self.existing_user(user)?;
                user_name("PolicyName", policy_name).map_err(|_| {
                    Rejection::new(
                        "PolicyName",
                        format!(
                            "PolicyName: '{policy_name}' must be 1 to 64 letters, digits or +=,.@_-"
                        ),
                    )
                })
            }
            IamCommand::DeleteUserPolicy { user, policy_name } => {
                if self.existing_user(user)?.policies.contains_key(policy_name) {
                    Ok(())
                } else {
                    Err(Rejection::new(
                        "PolicyName",
                        format!("PolicyName: {user} has no policy {policy_name}"),
                    ))
                }
            }
        }
    }

    pub(super) fn apply_iam(&mut self, cmd: IamCommand) -> Outcome {
        match cmd {
            IamCommand::CreateUser { name, user_id, at } => {
                let arn = format!("arn:aws:iam::{}:user/{name}", self.scope.account);
                self.users.insert(
                    name.clone(),
                    User {
                        name,
                        user_id,
                        arn,
                        created_at: at,
                        policies: Default::default(),
                    },
                );
            }
            IamCommand::DeleteUser { name } => {
                self.users.remove(&name);
            }
            IamCommand::CreateAccessKey {
                user,
                id,
                secret,
                at,
            } => {
                self.access_keys.insert(
                    id.clone(),
                    AccessKey {
                        id,
                        secret,
                        user,
                        status: KeyStatus::Active,
                        created_at: at,
                    },
                );
            }
            IamCommand::DeleteAccessKey { id, .. } => {
                self.access_keys.remove(&id);
            }
            IamCommand::PutUserPolicy {
                user,
                policy_name,
                policy,
            } => {
                if let Some(u) = self.users.get_mut(&user) {
                    u.policies.insert(policy_name, policy);
                }
            }
            IamCommand::DeleteUserPolicy { user, policy_name } => {
                if let Some(u) = self.users.get_mut(&user) {
                    u.policies.remove(&policy_name);
                }
            }
        }
        Outcome::Done
    }
}
