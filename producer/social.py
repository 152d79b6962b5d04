"""The social model: channels, posts (raising ``user.post``) and friend requests
(raising ``user.send_req``), the seed's ``POST /post`` and ``POST /send_req``.

Visibility: a channel is seen by its members. An id that does not exist is
404; a channel that exists but the caller is not in is 403. Friend requests
are acted on by their target only (404 for anybody else).

Events are staged with :func:`producer.outbox.add_event` in the transaction
that writes the row, so a post exists if and only if its event will be sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from pydantic import AfterValidator
from sqlalchemy.exc import IntegrityError
from sqlmodel import and_, col, delete, func, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.models import (
    Channel,
    ChannelMember,
    ChannelPreferences,
    FriendRequest,
    Post,
    ThreadSubscription,
    User,
    as_utc,
)
from herald.validation import display_name, email_address, one_line
from producer import auth, idempotency, mentions
from producer.auth import CurrentUser
from producer.deps import LiveDep, SessionsDep, user_changed
from producer.idempotency import IdempotencyDep
from producer.outbox import add_event
from producer.social_schemas import (
    ChannelDetail,
    ChannelIn,
    ChannelSummary,
    FriendRequestAccepted,
    FriendRequestIn,
    FriendRequestList,
    FriendRequestOut,
    MemberIn,
    PostAccepted,
    PostIn,
    PostOut,
    PostPage,
    UserRef,
    field_error,
)
from topology.envelope import Actor, Envelope, Recipient

log = logging.getLogger("herald.api")

router = APIRouter(tags=["social"], responses=auth.RESPONSES)

# Ids are compared with text columns: a NUL in one is a PostgreSQL error (500), so 422.
ChannelId = Annotated[str, Path(max_length=36, description="The channel's `id`."),
                      AfterValidator(one_line)]
RequestId = Annotated[str, Path(max_length=36, description="The friend request's `id`."),
                      AfterValidator(one_line)]

_Responses = dict[int | str, dict[str, Any]]
#: ``responses=`` of a route on one channel that only its members may use.
MEMBER_RESPONSES: _Responses = {403: {"description": "you are not a member of this channel"},
                                404: {"description": "no such channel"}}
_USER_404: _Responses = {404: {"description": "no such user"}}
_REQUEST_RESPONSES: _Responses = {404: {"description": "no such friend request to you"},
                                  409: {"description": "the request is no longer pending"}}


def _still_valid(check: Callable[[str], str], value: str | None) -> str | None:
    """``check(value)``, or None for a value stored before the API checked it that fails now."""
    if value is None:
        return None
    try:
        return check(value)
    except ValueError:
        return None


def recipient(user: User) -> Recipient:
    """``user`` with the contact details the channels need.

    A name or address stored before names and addresses were checked at the
    door, which the workers could not use (a line break in a name, a non-ASCII
    local part), is left out rather than failing the whole event: the email
    goes without a display name, or not at all, instead of this request
    answering 500.
    """
    return Recipient(user_id=user.id, email=_still_valid(email_address, user.email),
                     name=_still_valid(display_name, user.name), phone=user.phone,
                     locale=user.locale)


def actor(user: User) -> Actor:
    """``user`` as the actor of an event (a name the workers cannot show is left out)."""
    return Actor(id=user.id, name=_still_valid(display_name, user.name))


def _ref(user: User) -> UserRef:
    return UserRef(id=user.id, name=user.name, handle=user.handle)


async def require_member(session: AsyncSession, channel_id: str, user_id: str) -> Channel:
    """The channel, if ``user_id`` is in it.

    Raises:
        HTTPException: 404 when there is no such channel, 403 when the user is not a member.
    """
    channel = await session.get(Channel, channel_id)
    if channel is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such channel")
    if await session.get(ChannelMember, (channel_id, user_id)) is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "you are not a member of this channel")
    return channel


async def _members(session: AsyncSession, channel_id: str) -> list[User]:
    return list((await session.exec(
        select(User).join(ChannelMember, col(ChannelMember.user_id) == col(User.id))
        .where(col(ChannelMember.channel_id) == channel_id)
        .order_by(col(ChannelMember.joined_at), col(User.id)))).all())


def _detail(channel: Channel, members: list[User]) -> ChannelDetail:
    return ChannelDetail(id=channel.id, name=channel.name, is_dm=channel.is_dm,
                         created_by=channel.created_by, created_at=as_utc(channel.created_at),
                         member_count=len(members), members=[_ref(u) for u in members])


def _post(row: Post) -> PostOut:
    return PostOut(id=row.id, channel_id=row.channel_id, author_id=row.author_id, text=row.text,
                   thread_id=row.thread_id, created_at=as_utc(row.created_at))


# --- channels ----------------------------------------------------------------------------


@router.post("/channels", status_code=status.HTTP_201_CREATED, responses={
    404: {"description": "a member id names no user"},
    422: {"description": "invalid body, or a DM without exactly one other member"}})
async def create_channel(body: ChannelIn, user: CurrentUser,
                         sessions: SessionsDep) -> ChannelDetail:
    """Create a channel (or a DM) with the caller and ``member_ids`` as members."""
    others = list(dict.fromkeys(m for m in body.member_ids if m != user.id))
    if body.is_dm and len(others) != 1:
        raise field_error("member_ids", "a DM has exactly one member besides you")
    async with sessions() as session, session.begin():
        found = set((await session.exec(
            select(User.id).where(col(User.id).in_(others)))).all()) if others else set()
        for member_id in others:
            if member_id not in found:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no such user: {member_id}")
        channel = Channel(name=body.name, is_dm=body.is_dm, created_by=user.id)
        session.add(channel)
        await session.flush()
        session.add_all(ChannelMember(channel_id=channel.id, user_id=m)
                        for m in [user.id, *others])
        await session.flush()
        members = await _members(session, channel.id)
    return _detail(channel, members)


@router.get("/channels")
async def list_channels(user: CurrentUser, sessions: SessionsDep) -> list[ChannelSummary]:
    """The channels the caller is in, newest first, with their member counts."""
    mine = select(ChannelMember.channel_id).where(col(ChannelMember.user_id) == user.id)
    counts = (select(ChannelMember.channel_id, func.count().label("n"))
              .group_by(col(ChannelMember.channel_id)).subquery())
    async with sessions() as session:
        found = (await session.exec(
            select(Channel, counts.c.n).join(counts, counts.c.channel_id == col(Channel.id))
            .where(col(Channel.id).in_(mine))
            .order_by(col(Channel.created_at).desc(), col(Channel.id)))).all()
    return [ChannelSummary(id=c.id, name=c.name, is_dm=c.is_dm, created_by=c.created_by,
                           created_at=as_utc(c.created_at), member_count=n) for c, n in found]


@router.get("/channels/{channel_id}", responses=MEMBER_RESPONSES)
async def get_channel(channel_id: ChannelId, user: CurrentUser,
                      sessions: SessionsDep) -> ChannelDetail:
    """A channel the caller is in, with its members."""
    async with sessions() as session:
        channel = await require_member(session, channel_id, user.id)
        return _detail(channel, await _members(session, channel_id))


@router.post("/channels/{channel_id}/members", status_code=status.HTTP_201_CREATED, responses={
    200: {"description": "already a member: nothing changed", "model": ChannelDetail},
    403: MEMBER_RESPONSES[403],
    404: {"description": "no such channel, or no such user"},
    422: {"description": "invalid body, or the channel is a DM"}})
async def add_member(channel_id: ChannelId, body: MemberIn, user: CurrentUser,
                     sessions: SessionsDep, response: Response) -> ChannelDetail:
    """Add a user to a channel the caller is in (201; 200 if they were in it already)."""
    try:
        async with sessions() as session, session.begin():
            channel = await require_member(session, channel_id, user.id)
            if channel.is_dm:
                raise field_error("user_id", "a DM's members are fixed; create a channel")
            if await session.get(User, body.user_id) is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no such user: {body.user_id}")
            if await session.get(ChannelMember, (channel_id, body.user_id)) is None:
                session.add(ChannelMember(channel_id=channel_id, user_id=body.user_id))
                await session.flush()
            else:
                response.status_code = status.HTTP_200_OK
            members = await _members(session, channel_id)
    except IntegrityError:  # added concurrently: the same outcome
        response.status_code = status.HTTP_200_OK
        async with sessions() as session:
            members = await _members(session, channel_id)
    return _detail(channel, members)


@router.delete("/channels/{channel_id}/members/me", status_code=status.HTTP_204_NO_CONTENT,
               responses=MEMBER_RESPONSES)
async def leave_channel(channel_id: ChannelId, user: CurrentUser, sessions: SessionsDep,
                        live: LiveDep) -> None:
    """Leave a channel (its posts stop notifying you; your settings for it are dropped)."""
    async with sessions() as session, session.begin():
        await require_member(session, channel_id, user.id)
        await session.exec(delete(ChannelMember).where(
            col(ChannelMember.channel_id) == channel_id, col(ChannelMember.user_id) == user.id))
        await session.exec(delete(ChannelPreferences).where(
            col(ChannelPreferences.channel_id) == channel_id,
            col(ChannelPreferences.user_id) == user.id))
    await user_changed(live, user.id)


@router.get("/channels/{channel_id}/posts", responses={
    **MEMBER_RESPONSES, 422: {"description": "bad paging (`before` is no post of this channel)"}})
async def list_posts(
    channel_id: ChannelId, user: CurrentUser, sessions: SessionsDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 50,
    before: Annotated[str | None, Query(
        max_length=36, description="Only posts older than this post id (`next_before`)."),
        AfterValidator(one_line)] = None,
) -> PostPage:
    """A channel's posts and replies, newest first, a page at a time (keyset)."""
    async with sessions() as session:
        await require_member(session, channel_id, user.id)
        query = select(Post).where(col(Post.channel_id) == channel_id)
        if before is not None:
            cursor = await session.get(Post, before)
            if cursor is None or cursor.channel_id != channel_id:
                raise field_error("before", "not a post of this channel", where="query")
            query = query.where(or_(col(Post.created_at) < cursor.created_at,
                                    and_(col(Post.created_at) == cursor.created_at,
                                         col(Post.id) < cursor.id)))
        found = list((await session.exec(query.order_by(
            col(Post.created_at).desc(), col(Post.id).desc()).limit(limit + 1))).all())
    page = found[:limit]
    return PostPage(items=[_post(p) for p in page],
                    next_before=page[-1].id if len(found) > limit else None)


# --- posts -------------------------------------------------------------------------------


async def _subscribe(session: AsyncSession, thread_id: str, user_id: str) -> None:
    if await session.get(ThreadSubscription, (thread_id, user_id)) is None:
        session.add(ThreadSubscription(thread_id=thread_id, user_id=user_id))


def _post_event(author: User, channel: Channel, post: Post, others: list[User]) -> Envelope:
    parsed = mentions.parse(post.text)
    by_handle = {u.handle: u.id for u in others if u.handle}
    mentioned = list(dict.fromkeys(by_handle[h] for h in parsed.handles if h in by_handle))
    return Envelope(
        type="user.post",
        actor=actor(author),
        recipients=[recipient(u) for u in others],
        data={"post_id": post.id, "channel_id": channel.id, "channel_name": channel.name,
              "is_dm": channel.is_dm, "text": post.text, "thread_id": post.thread_id,
              "mentions": mentioned, "special_mention": parsed.special,
              "author_name": author.name})


@router.post("/post", status_code=status.HTTP_201_CREATED, tags=["events"], responses={
    **idempotency.RESPONSES,
    403: MEMBER_RESPONSES[403],
    404: {"description": "no such channel, or no such thread"},
    422: {"description": "invalid body; or thread_id is a reply or in another channel; or the "
                         "Idempotency-Key was already used with another body"}})
async def create_post(body: PostIn, user: CurrentUser, sessions: SessionsDep,
                      idem: IdempotencyDep) -> PostAccepted:
    """Post to a channel (a reply when ``thread_id`` is given) and raise ``user.post``.

    The author follows the thread (a top-level post's own, or the one
    replied to). The event goes to every other member; with nobody else in
    the channel there is none and ``event_id`` is null.
    """
    for attempt in (1, 2):  # a concurrent first reply of this user to the thread: again
        try:
            async with sessions() as session, session.begin():
                channel = await require_member(session, body.channel_id, user.id)
                if body.thread_id is not None:
                    root = await session.get(Post, body.thread_id)
                    if root is None:
                        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such thread")
                    if root.channel_id != channel.id or root.thread_id is not None:
                        raise field_error("thread_id", "not a top-level post of this channel")
                post = Post(channel_id=channel.id, author_id=user.id, text=body.text,
                            thread_id=body.thread_id)
                session.add(post)
                await session.flush()
                await _subscribe(session, body.thread_id or post.id, user.id)
                others = [u for u in await _members(session, channel.id) if u.id != user.id]
                envelope = _post_event(user, channel, post, others) if others else None
                if envelope is not None:
                    add_event(session, envelope)
                accepted = PostAccepted(post=_post(post),
                                        event_id=envelope.id if envelope else None)
                await idem.stage(session, accepted)
            break
        except IntegrityError:
            if attempt == 2:
                raise
    log.info("post %s channel=%s event=%s", post.id, channel.id, accepted.event_id)
    return accepted


# --- friend requests ---------------------------------------------------------------------


async def _request_out(session: AsyncSession, rows: list[FriendRequest]) -> list[FriendRequestOut]:
    ids = {r.from_user_id for r in rows} | {r.to_user_id for r in rows}
    users = {u.id: u for u in (await session.exec(
        select(User).where(col(User.id).in_(ids)))).all()} if ids else {}
    return [FriendRequestOut(id=r.id, from_user=_ref(users[r.from_user_id]),
                             to_user=_ref(users[r.to_user_id]),
                             status=r.status,
                             created_at=as_utc(r.created_at)) for r in rows]


@router.post("/friend-req", status_code=status.HTTP_201_CREATED, tags=["events"], responses={
    **idempotency.RESPONSES, **_USER_404,
    409: {"description": "a request between you two is pending, or you are friends already"},
    422: {"description": "invalid body (or a request to yourself)"}})
@router.post("/send_req", status_code=status.HTTP_201_CREATED, tags=["events"], responses={
    **idempotency.RESPONSES, **_USER_404,
    409: {"description": "a request between you two is pending, or you are friends already"},
    422: {"description": "invalid body (or a request to yourself)"}},
    summary="Send Friend Request (alias of /friend-req, the seed's name)")
async def send_friend_request(body: FriendRequestIn, user: CurrentUser, sessions: SessionsDep,
                              idem: IdempotencyDep) -> FriendRequestAccepted:
    """Ask another user to be friends and raise ``user.send_req`` (a push to them)."""
    if body.to_user_id == user.id:
        raise field_error("to_user_id", "you cannot send a friend request to yourself")
    async with sessions() as session, session.begin():
        target = await session.get(User, body.to_user_id)
        if target is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such user")
        pair = or_(and_(col(FriendRequest.from_user_id) == user.id,
                        col(FriendRequest.to_user_id) == target.id),
                   and_(col(FriendRequest.from_user_id) == target.id,
                        col(FriendRequest.to_user_id) == user.id))
        states = set((await session.exec(select(FriendRequest.status).where(pair))).all())
        if "pending" in states:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                "a friend request between you two is pending")
        if "accepted" in states:
            raise HTTPException(status.HTTP_409_CONFLICT, "you are friends already")
        request = FriendRequest(from_user_id=user.id, to_user_id=target.id)
        session.add(request)
        envelope = Envelope(
            type="user.send_req", actor=actor(user),
            recipients=[recipient(target)],
            data={"request_id": request.id, "from_user_id": user.id, "from_name": user.name,
                  "from_handle": user.handle})
        add_event(session, envelope)
        [out] = await _request_out(session, [request])
        accepted = FriendRequestAccepted(request=out, event_id=envelope.id)
        await idem.stage(session, accepted)
    log.info("friend request %s event=%s", request.id, envelope.id)
    return accepted


@router.get("/me/friend-requests")
async def list_friend_requests(user: CurrentUser, sessions: SessionsDep) -> FriendRequestList:
    """Friend requests to the caller and from them, every status, newest first."""
    mine = or_(col(FriendRequest.to_user_id) == user.id,
               col(FriendRequest.from_user_id) == user.id)
    async with sessions() as session:
        rows = list((await session.exec(select(FriendRequest).where(mine).order_by(
            col(FriendRequest.created_at).desc(), col(FriendRequest.id)))).all())
        out = await _request_out(session, rows)
    return FriendRequestList(incoming=[o for o in out if o.to_user.id == user.id],
                             outgoing=[o for o in out if o.from_user.id == user.id])


async def _answer(sessions: SessionsDep, request_id: str, user_id: str,
                  new_status: str) -> FriendRequestOut:
    async with sessions() as session, session.begin():
        row = await session.get(FriendRequest, request_id)
        if row is None or row.to_user_id != user_id:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such friend request")
        if row.status != "pending":
            raise HTTPException(status.HTTP_409_CONFLICT, f"the request is {row.status}")
        row.status = new_status
        session.add(row)
        [out] = await _request_out(session, [row])
    return out


@router.post("/friend-req/{request_id}/accept", responses=_REQUEST_RESPONSES)
async def accept_friend_request(request_id: RequestId, user: CurrentUser,
                                sessions: SessionsDep) -> FriendRequestOut:
    """Accept a pending request sent to the caller."""
    return await _answer(sessions, request_id, user.id, "accepted")


@router.post("/friend-req/{request_id}/decline", responses=_REQUEST_RESPONSES)
async def decline_friend_request(request_id: RequestId, user: CurrentUser,
                                 sessions: SessionsDep) -> FriendRequestOut:
    """Decline a pending request sent to the caller (they may ask again later)."""
    return await _answer(sessions, request_id, user.id, "declined")


# --- users -------------------------------------------------------------------------------


@router.get("/users", responses=_USER_404)
async def find_user(
    _user: CurrentUser, sessions: SessionsDep,
    handle: Annotated[str, Query(min_length=1, max_length=41,
                                 description="A handle, with or without the leading @."),
                      AfterValidator(one_line)],
) -> UserRef:
    """Look a user up by handle (case-insensitive): their id, name and handle."""
    wanted = handle.strip().removeprefix("@").lower()
    async with sessions() as session:
        found = (await session.exec(select(User).where(col(User.handle) == wanted))).first()
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such user")
    return _ref(found)
