from pydantic import BaseModel


class Me(BaseModel):
    account_id: int
    phone: str
    blocked_for_arrears: bool
