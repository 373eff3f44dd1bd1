"""Who is calling, and which execution roles they may hand a job.

A caller is an account in a region, as SageMaker scopes jobs: names, ARNs, List, Describe, Stop and
Delete live inside one (account, region) pair. The active-job limit is the exception: it counts an
account's jobs in every region, because all of them run on this one host and the region is only what
the caller chose to sign for (``Store.create_job``). A region SageMaker does not serve is refused
(``check_region``). The HTTP server builds the caller from the SigV4 signature (the key's account,
the credential scope's region); the local CLI is the home caller, the account and region optjob runs as.

RoleArn rules, decided here before a job is stored:

* a role of another account is refused as SageMaker refuses it: the caller may not pass it
  (``AccessDeniedException`` in IAM's wording);
* with a roles file, a role the file does not hold is one that cannot be assumed
  (``ValidationException``, SageMaker's "Could not assume role" message);
* with ambient credentials (single-tenant: optjob's own AWS credentials, today's behaviour) the
  role is recorded but not used; ``optjob serve`` says so when it starts, and a server with
  several accounts refuses to start in that mode, so tenants never share the server's credentials.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from optjob.api.errors import ApiError, ValidationException
from optjob.settings import Settings

_ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::(\d{12}):role/")


def partition_of(region: str) -> str:
    """The ARN partition a region belongs to."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


class AccessDenied(ApiError):
    code = "AccessDeniedException"


@dataclass(frozen=True)
class Caller:
    """An authenticated principal of one account, calling in one region."""

    account_id: str
    region: str
    principal: str = "local"

    @property
    def tenant(self) -> tuple[str, str]:
        return self.account_id, self.region

    @property
    def partition(self) -> str:
        return partition_of(self.region)

    def job_arn(self, name: str) -> str:
        return f"arn:{self.partition}:sagemaker:{self.region}:{self.account_id}:optimization-job/{name}"

    @property
    def user_arn(self) -> str:
        return f"arn:{self.partition}:iam::{self.account_id}:user/{self.principal}"


def home_caller(settings: Settings) -> Caller:
    """The account and region optjob runs as: the local CLI's caller and unsigned requests'."""
    return Caller(settings.account_id, settings.region)


def check_region(caller: Caller) -> None:
    """Refuse a region SageMaker does not serve (the signature's scope is the caller's choice, so it is
    input): a ValidationException before anything is stored or looked up by region."""
    from optjob.package.images import known_regions

    if caller.region not in known_regions():
        shown = caller.region if len(caller.region) <= 64 else caller.region[:64] + "..."
        raise ValidationException(
            f"The region '{shown}' is not a SageMaker region optjob serves; sign the request for one of the "
            "regions in configs/images.yaml (for example us-east-1)"
        )


def role_account(role_arn: str) -> str | None:
    match = _ROLE_ARN.match(role_arn)
    return match.group(1) if match else None


def check_role(caller: Caller, role_arn: str, settings: Settings, roles: frozenset[str] | None) -> None:
    """Raise if ``caller`` may not run a job as ``role_arn``.

    ``roles``: the role ARNs of the roles file (None without one). The account rule applies
    whenever roles are honoured, and in ambient mode to every account but the home one, whose
    single-tenant requests have always named roles of any account.
    """
    owner = role_account(role_arn)
    honoured = settings.role_credentials != "ambient"
    if owner != caller.account_id and (honoured or caller.account_id != settings.account_id):
        raise AccessDenied(
            f"User: {caller.user_arn} is not authorized to perform: iam:PassRole on resource: {role_arn}: "
            f"the role belongs to account {owner}, not {caller.account_id}. Name a role of account "
            f"{caller.account_id} in RoleArn."
        )
    if roles is not None and role_arn not in roles:
        raise ValidationException(
            f"Could not assume role {role_arn}. Please ensure that the role exists and allows principal "
            "'sagemaker.amazonaws.com' to assume the role (optjob: the server's roles file has no section "
            "for it; ask the optjob operator to add the role's keys)."
        )
