"""Store errors.

StoreError
 +-- UserExists          the username is taken
 +-- NotFound            a user, room or message does not exist (or is not visible)
 +-- Forbidden           the caller may not do this
"""


class StoreError(Exception):
    pass


class UserExists(StoreError):
    pass


class NotFound(StoreError):
    pass


class Forbidden(StoreError):
    pass
