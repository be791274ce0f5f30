/*
 * Compiled fast paths for the tar header reader and writer.
 *
 * scan() reads the headers of the common cases: ustar and GNU ustar members
 * with octal number fields, GNU long names and link targets, and local PAX
 * headers with the records that matter for a rootfs. Errors about the
 * input are left to tarscan.py: at anything else (a bad checksum, a
 * base-256 or malformed number, a global or sparse header, a truncated
 * member, an unknown type) scan() stops at the header that starts that
 * member and returns SCAN_PYTHON. tarscan.py then reads that member in
 * Python, which reports every error. tests/test_ctar.py compares the two readers.
 *
 * ustar_header() builds one ustar header block from fields that fit it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <string.h>
#include <unistd.h>

#define BLOCK 512
#define READ_AHEAD (64 * 1024)
/* Longer PAX headers or long names are left to the Python reader. */
#define MAX_META (1024 * 1024)
/* Regions ending beyond 2**60 are left to the Python reader, so that no
 * offset arithmetic here can overflow. */
#define MAX_OFFSET (1LL << 60)

/* The first values too large for the 8-byte (uid, gid) and 12-byte (size,
 * mtime) octal fields of a ustar header: 8**7 and 8**11. */
#define MAX_ID (1LL << 21)
#define MAX_SIZE (1LL << 33)

enum { SCAN_MORE = 0, SCAN_DONE = 1, SCAN_PYTHON = 2 };

/* The TarEntry attribute names, interned once. */
enum {
    F_NAME, F_TYPE, F_MODE, F_UID, F_GID, F_UNAME, F_GNAME, F_MTIME,
    F_MTIME_TEXT, F_SIZE, F_LINKNAME, F_DEVMAJOR, F_DEVMINOR, F_XATTRS,
    F_OFFSET, F_SPARSE, F_REAL_SIZE, F_COUNT
};
static const char *field_names[F_COUNT] = {
    "name", "type", "mode", "uid", "gid", "uname", "gname", "mtime",
    "mtime_text", "size", "linkname", "devmajor", "devminor", "xattrs",
    "offset", "sparse", "real_size",
};
static PyObject *field_objects[F_COUNT];

/* A read-ahead window over [start, end) of a file. */
typedef struct {
    int fd;
    long long end;
    long long buffer_start;
    Py_ssize_t buffer_length;
    Py_ssize_t capacity;
    char *buffer;
} Window;

/*
 * Make [pos, pos + length) available and return a pointer to it. Return
 * NULL when the region or the file ends first or the read fails.
 */
static const char *
window_get(Window *window, long long pos, Py_ssize_t length)
{
    if (pos >= window->buffer_start && pos + length <= window->buffer_start + window->buffer_length)
        return window->buffer + (pos - window->buffer_start);
    if (length > window->end - pos)
        return NULL;
    long long want = length > READ_AHEAD ? length : READ_AHEAD;
    if (want > window->end - pos)
        want = window->end - pos;
    if (want > window->capacity) {
        char *bigger = PyMem_Realloc(window->buffer, (size_t)want);
        if (bigger == NULL)
            return NULL;
        window->buffer = bigger;
        window->capacity = (Py_ssize_t)want;
    }
    Py_ssize_t got = 0;
    while (got < want) {
        ssize_t count;
        Py_BEGIN_ALLOW_THREADS
        count = pread(window->fd, window->buffer + got, (size_t)(want - got), (off_t)(pos + got));
        Py_END_ALLOW_THREADS
        if (count < 0 && errno == EINTR)
            continue;
        if (count <= 0)
            break;
        got += count;
    }
    window->buffer_start = pos;
    window->buffer_length = got;
    if (got < length)
        return NULL;
    return window->buffer;
}

/*
 * Parse an octal field the way every common writer fills it: optional
 * leading spaces, octal digits, then only NULs or spaces. Return 0 and set
 * *value, or -1 for anything else (left to the Python reader).
 */
static int
parse_octal(const char *field, int width, long long *value)
{
    int end = width;
    while (end > 0 && (field[end - 1] == '\0' || field[end - 1] == ' '))
        end--;
    int i = 0;
    while (i < end && field[i] == ' ')
        i++;
    long long result = 0;
    for (; i < end; i++) {
        char c = field[i];
        if (c < '0' || c > '7')
            return -1;
        result = result * 8 + (c - '0');
    }
    *value = result;
    return 0;
}

/* Parse 1 to 18 ASCII decimal digits. Return -1 for anything else. */
static int
parse_decimal(const char *text, Py_ssize_t length, long long *value)
{
    if (length <= 0 || length > 18)
        return -1;
    long long result = 0;
    for (Py_ssize_t i = 0; i < length; i++) {
        char c = text[i];
        if (c < '0' || c > '9')
            return -1;
        result = result * 10 + (c - '0');
    }
    *value = result;
    return 0;
}

static Py_ssize_t
field_length(const char *field, Py_ssize_t width)
{
    const char *nul = memchr(field, '\0', (size_t)width);
    return nul ? nul - field : width;
}

/* The fields of one member, collected from its headers. */
typedef struct {
    PyObject *name;       /* bytes or NULL */
    PyObject *linkname;
    PyObject *uname;
    PyObject *gname;
    PyObject *mtime_text; /* bytes or NULL for None */
    PyObject *xattrs;     /* dict or NULL for None */
    long long mode, uid, gid, size, mtime, devmajor, devminor;
} Member;

/* The PAX records seen so far for the next member. NULL means not given. */
typedef struct {
    PyObject *path, *linkpath, *uname, *gname, *mtime_text, *xattrs;
    long long size, uid, gid, mtime;
    int has_size, has_uid, has_gid, has_mtime, seen;
} Pax;

static void
pax_clear(Pax *pax)
{
    Py_CLEAR(pax->path);
    Py_CLEAR(pax->linkpath);
    Py_CLEAR(pax->uname);
    Py_CLEAR(pax->gname);
    Py_CLEAR(pax->mtime_text);
    Py_CLEAR(pax->xattrs);
    pax->has_size = pax->has_uid = pax->has_gid = pax->has_mtime = pax->seen = 0;
}

static void
member_clear(Member *member)
{
    Py_CLEAR(member->name);
    Py_CLEAR(member->linkname);
    Py_CLEAR(member->uname);
    Py_CLEAR(member->gname);
    Py_CLEAR(member->mtime_text);
    Py_CLEAR(member->xattrs);
}

static int
starts_with(const char *text, Py_ssize_t length, const char *prefix)
{
    size_t prefix_length = strlen(prefix);
    return (size_t)length >= prefix_length && memcmp(text, prefix, prefix_length) == 0;
}

static int
equals(const char *text, Py_ssize_t length, const char *word)
{
    return (size_t)length == strlen(word) && memcmp(text, word, (size_t)length) == 0;
}

/* Replace *slot with a new bytes object. Return -1 on a memory error. */
static int
set_bytes(PyObject **slot, const char *text, Py_ssize_t length)
{
    PyObject *value = PyBytes_FromStringAndSize(text, length);
    if (value == NULL)
        return -1;
    Py_XSETREF(*slot, value);
    return 0;
}

/*
 * Parse a PAX time: an optional minus, 1 to 18 digits, and an optional
 * fraction of 1 to 9 digits. Set *seconds, and *fraction to 1 if present.
 */
static int
parse_pax_time(const char *text, Py_ssize_t length, long long *seconds, int *fraction)
{
    Py_ssize_t i = 0;
    int negative = 0;
    if (i < length && text[i] == '-') {
        negative = 1;
        i++;
    }
    Py_ssize_t digits_start = i;
    while (i < length && text[i] >= '0' && text[i] <= '9')
        i++;
    long long value;
    if (parse_decimal(text + digits_start, i - digits_start, &value) < 0)
        return -1;
    *fraction = 0;
    if (i < length) {
        if (text[i] != '.')
            return -1;
        Py_ssize_t fraction_digits = length - i - 1;
        if (fraction_digits < 1 || fraction_digits > 9)
            return -1;
        for (Py_ssize_t j = i + 1; j < length; j++)
            if (text[j] < '0' || text[j] > '9')
                return -1;
        *fraction = 1;
    }
    *seconds = negative ? -value : value;
    return 0;
}

/*
 * Read PAX records into *pax. Return 0, 1 to leave the member to Python, or
 * -1 on a memory error.
 */
static int
parse_pax(const char *data, Py_ssize_t size, Pax *pax)
{
    Py_ssize_t pos = 0;
    pax->seen = 1;
    while (pos < size) {
        if (data[pos] == '\0')
            break;
        const char *space = memchr(data + pos, ' ', (size_t)(size - pos));
        if (space == NULL)
            return 1;
        long long length;
        if (parse_decimal(data + pos, space - (data + pos), &length) < 0)
            return 1;
        if (length <= 0 || length > size - pos || data[pos + length - 1] != '\n')
            return 1;
        const char *record = space + 1;
        const char *record_end = data + pos + length - 1;
        if (record > record_end)
            return 1;
        Py_ssize_t record_length = record_end - record;
        const char *equal = memchr(record, '=', (size_t)record_length);
        if (equal == NULL)
            return 1;
        Py_ssize_t key_length = equal - record;
        const char *value = equal + 1;
        Py_ssize_t value_length = record_end - value;
        long long number;
        if (equals(record, key_length, "path")) {
            if (set_bytes(&pax->path, value, value_length) < 0)
                return -1;
        } else if (equals(record, key_length, "linkpath")) {
            if (set_bytes(&pax->linkpath, value, value_length) < 0)
                return -1;
        } else if (equals(record, key_length, "uname")) {
            if (set_bytes(&pax->uname, value, value_length) < 0)
                return -1;
        } else if (equals(record, key_length, "gname")) {
            if (set_bytes(&pax->gname, value, value_length) < 0)
                return -1;
        } else if (equals(record, key_length, "size")) {
            if (parse_decimal(value, value_length, &number) < 0)
                return 1;
            pax->size = number;
            pax->has_size = 1;
        } else if (equals(record, key_length, "uid")) {
            if (parse_decimal(value, value_length, &number) < 0)
                return 1;
            pax->uid = number;
            pax->has_uid = 1;
        } else if (equals(record, key_length, "gid")) {
            if (parse_decimal(value, value_length, &number) < 0)
                return 1;
            pax->gid = number;
            pax->has_gid = 1;
        } else if (equals(record, key_length, "mtime")) {
            int fraction;
            if (parse_pax_time(value, value_length, &number, &fraction) < 0)
                return 1;
            pax->mtime = number;
            pax->has_mtime = 1;
            if (fraction) {
                if (set_bytes(&pax->mtime_text, value, value_length) < 0)
                    return -1;
            } else {
                Py_CLEAR(pax->mtime_text);
            }
        } else if (starts_with(record, key_length, "SCHILY.xattr.")) {
            if (pax->xattrs == NULL && (pax->xattrs = PyDict_New()) == NULL)
                return -1;
            PyObject *name = PyBytes_FromStringAndSize(record + 13, key_length - 13);
            PyObject *content = PyBytes_FromStringAndSize(value, value_length);
            int failed = name == NULL || content == NULL ||
                         PyDict_SetItem(pax->xattrs, name, content) < 0;
            Py_XDECREF(name);
            Py_XDECREF(content);
            if (failed)
                return -1;
        } else if (starts_with(record, key_length, "GNU.sparse.")) {
            return 1;
        }
        pos += length;
    }
    return 0;
}

/*
 * The offset of each TarEntry slot in the instance, found from the class's
 * member descriptors on the first call. Storing there directly is what the
 * descriptors' own setters do, without the attribute lookups.
 */
static PyTypeObject *slots_type;
static Py_ssize_t slot_offsets[F_COUNT];

static int
find_slots(PyTypeObject *entry_type)
{
    if (slots_type == entry_type)
        return 0;
    for (int i = 0; i < F_COUNT; i++) {
        PyObject *descriptor = PyDict_GetItemWithError(entry_type->tp_dict,
                                                       field_objects[i]);
        /* The descriptor must belong to entry_type itself, or its offset
         * could lie outside the instances that tp_alloc makes. */
        if (descriptor == NULL || !PyObject_TypeCheck(descriptor, &PyMemberDescr_Type) ||
            PyDescr_TYPE(descriptor) != entry_type) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "%s has no slot %U",
                             entry_type->tp_name, field_objects[i]);
            return -1;
        }
        PyMemberDef *member = ((PyMemberDescrObject *)descriptor)->d_member;
        if (member->type != T_OBJECT_EX || (member->flags & READONLY)) {
            PyErr_Format(PyExc_TypeError, "slot %U is not a plain object slot",
                         field_objects[i]);
            return -1;
        }
        slot_offsets[i] = member->offset;
    }
    Py_XSETREF(slots_type, (PyTypeObject *)Py_NewRef(entry_type));
    return 0;
}

/* Build a TarEntry from *member, or return NULL on a memory error. */
static PyObject *
make_entry(PyTypeObject *entry_type, Member *member, char typeflag, long long offset)
{
    PyObject *values[F_COUNT];
    values[F_NAME] = Py_NewRef(member->name);
    values[F_TYPE] = PyBytes_FromStringAndSize(&typeflag, 1);
    values[F_MODE] = PyLong_FromLongLong(member->mode);
    values[F_UID] = PyLong_FromLongLong(member->uid);
    values[F_GID] = PyLong_FromLongLong(member->gid);
    values[F_UNAME] = Py_NewRef(member->uname);
    values[F_GNAME] = Py_NewRef(member->gname);
    values[F_MTIME] = PyLong_FromLongLong(member->mtime);
    values[F_MTIME_TEXT] = Py_NewRef(member->mtime_text ? member->mtime_text : Py_None);
    values[F_SIZE] = PyLong_FromLongLong(member->size);
    values[F_LINKNAME] = Py_NewRef(member->linkname);
    values[F_DEVMAJOR] = PyLong_FromLongLong(member->devmajor);
    values[F_DEVMINOR] = PyLong_FromLongLong(member->devminor);
    values[F_XATTRS] = Py_NewRef(member->xattrs ? member->xattrs : Py_None);
    values[F_OFFSET] = PyLong_FromLongLong(offset);
    values[F_SPARSE] = Py_NewRef(Py_None);
    values[F_REAL_SIZE] = PyLong_FromLong(0);
    PyObject *entry = NULL;
    int complete = 1;
    for (int i = 0; i < F_COUNT; i++)
        if (values[i] == NULL)
            complete = 0;
    if (complete)
        entry = entry_type->tp_alloc(entry_type, 0);
    if (entry == NULL) {
        for (int i = 0; i < F_COUNT; i++)
            Py_XDECREF(values[i]);
        return NULL;
    }
    /* tp_alloc zero-fills, so every slot starts empty and takes one value. */
    for (int i = 0; i < F_COUNT; i++)
        *(PyObject **)((char *)entry + slot_offsets[i]) = values[i];
    return entry;
}

static int
is_member_type(char typeflag)
{
    return typeflag == '0' || typeflag == '\0' || typeflag == '7' ||
           (typeflag >= '1' && typeflag <= '6');
}

static int
is_header_only_type(char typeflag)
{
    return typeflag >= '1' && typeflag <= '6';
}

/*
 * The ustar checksum: the sum of the block's bytes with the checksum field
 * counted as spaces. Return 1 when the stored value matches.
 */
static int
checksum_ok(const unsigned char *block, unsigned int total)
{
    long long stored;
    if (parse_octal((const char *)block + 148, 8, &stored) < 0)
        return 0;
    unsigned int field = 0;
    for (int i = 148; i < 156; i++)
        field += block[i];
    return (long long)(total - field + 256) == stored;
}

static unsigned int
byte_sum(const unsigned char *block)
{
    unsigned int total = 0;
    for (int i = 0; i < BLOCK; i++)
        total += block[i];
    return total;
}

/*
 * Read one member: its metadata headers (PAX, GNU long name or link) and its
 * own header. Return SCAN_MORE with *entry set, SCAN_DONE at the end of the
 * archive, SCAN_PYTHON to leave this member to Python, or -1 on a memory
 * error. *pos moves past the member only on SCAN_MORE.
 */
static int
read_member(Window *window, PyTypeObject *entry_type, long long *pos, PyObject **entry)
{
    long long at = *pos;
    Member member;
    Pax pax;
    memset(&member, 0, sizeof member);
    memset(&pax, 0, sizeof pax);
    PyObject *long_name = NULL, *long_link = NULL;
    int status = SCAN_PYTHON;

    for (;;) {
        if (at >= window->end) { /* padding may end past the region */
            status = (long_name || long_link || pax.seen) ? SCAN_PYTHON : SCAN_DONE;
            goto out;
        }
        const unsigned char *block = (const unsigned char *)window_get(window, at, BLOCK);
        if (block == NULL)
            goto out; /* a partial block, which Python reads */
        unsigned int total = byte_sum(block);
        if (total == 0) { /* a zero block ends the archive */
            status = (long_name || long_link || pax.seen) ? SCAN_PYTHON : SCAN_DONE;
            goto out;
        }
        if (!checksum_ok(block, total))
            goto out;
        const char *header = (const char *)block;
        long long size, mode, uid, gid, mtime, devmajor, devminor;
        if (parse_octal(header + 100, 8, &mode) < 0 || parse_octal(header + 108, 8, &uid) < 0 ||
            parse_octal(header + 116, 8, &gid) < 0 || parse_octal(header + 124, 12, &size) < 0 ||
            parse_octal(header + 136, 12, &mtime) < 0 ||
            parse_octal(header + 329, 8, &devmajor) < 0 ||
            parse_octal(header + 337, 8, &devminor) < 0)
            goto out;
        char typeflag = header[156];
        long long data_start = at + BLOCK;
        if (typeflag == 'x' || typeflag == 'L' || typeflag == 'K') {
            if (size > MAX_META)
                goto out;
            const char *data = window_get(window, data_start, (Py_ssize_t)size);
            if (data == NULL)
                goto out;
            if (typeflag == 'x') {
                int result = parse_pax(data, (Py_ssize_t)size, &pax);
                if (result != 0) {
                    status = result < 0 ? -1 : SCAN_PYTHON;
                    goto out;
                }
            } else {
                PyObject **slot = typeflag == 'L' ? &long_name : &long_link;
                if (set_bytes(slot, data, field_length(data, (Py_ssize_t)size)) < 0) {
                    status = -1;
                    goto out;
                }
            }
            at = data_start + (size + BLOCK - 1) / BLOCK * BLOCK;
            continue;
        }
        if (!is_member_type(typeflag))
            goto out; /* global headers, sparse files, volume labels, errors */

        /* The member's own header. */
        Py_ssize_t name_length = field_length(header, 100);
        if (header[345] && memcmp(header + 257, "ustar\0", 6) == 0) {
            Py_ssize_t prefix_length = field_length(header + 345, 155);
            member.name = PyBytes_FromStringAndSize(NULL, prefix_length + 1 + name_length);
            if (member.name == NULL) {
                status = -1;
                goto out;
            }
            char *text = PyBytes_AS_STRING(member.name);
            memcpy(text, header + 345, (size_t)prefix_length);
            text[prefix_length] = '/';
            memcpy(text + prefix_length + 1, header, (size_t)name_length);
        } else if (set_bytes(&member.name, header, name_length) < 0) {
            status = -1;
            goto out;
        }
        if (set_bytes(&member.linkname, header + 157, field_length(header + 157, 100)) < 0 ||
            set_bytes(&member.uname, header + 265, field_length(header + 265, 32)) < 0 ||
            set_bytes(&member.gname, header + 297, field_length(header + 297, 32)) < 0) {
            status = -1;
            goto out;
        }
        member.mode = mode & 07777;
        member.uid = uid;
        member.gid = gid;
        member.size = size;
        member.mtime = mtime;
        member.devmajor = devmajor;
        member.devminor = devminor;
        if (long_name)
            Py_SETREF(member.name, Py_NewRef(long_name));
        if (long_link)
            Py_SETREF(member.linkname, Py_NewRef(long_link));
        if (pax.path)
            Py_SETREF(member.name, Py_NewRef(pax.path));
        if (pax.linkpath)
            Py_SETREF(member.linkname, Py_NewRef(pax.linkpath));
        if (pax.uname)
            Py_SETREF(member.uname, Py_NewRef(pax.uname));
        if (pax.gname)
            Py_SETREF(member.gname, Py_NewRef(pax.gname));
        if (pax.has_size)
            member.size = pax.size;
        if (pax.has_uid)
            member.uid = pax.uid;
        if (pax.has_gid)
            member.gid = pax.gid;
        if (pax.has_mtime) {
            member.mtime = pax.mtime;
            member.mtime_text = pax.mtime_text ? Py_NewRef(pax.mtime_text) : NULL;
        }
        if (pax.xattrs)
            member.xattrs = Py_NewRef(pax.xattrs);
        if (is_header_only_type(typeflag))
            member.size = 0;
        if (member.size > window->end - data_start)
            goto out; /* the data runs past the region */
        *entry = make_entry(entry_type, &member, typeflag, data_start);
        if (*entry == NULL) {
            status = -1;
            goto out;
        }
        *pos = data_start + (member.size + BLOCK - 1) / BLOCK * BLOCK;
        status = SCAN_MORE;
        goto out;
    }
out:
    member_clear(&member);
    pax_clear(&pax);
    Py_XDECREF(long_name);
    Py_XDECREF(long_link);
    return status;
}

static PyObject *
scan(PyObject *module, PyObject *args)
{
    int fd, limit;
    long long pos, end;
    PyObject *entry_type;
    if (!PyArg_ParseTuple(args, "iLLiO!", &fd, &pos, &end, &limit, &PyType_Type,
                          &entry_type))
        return NULL;
    if (pos < 0 || end < 0 || limit <= 0) {
        PyErr_SetString(PyExc_ValueError,
                        "invalid region or limit: pos and end must be >= 0, limit >= 1");
        return NULL;
    }
    if (find_slots((PyTypeObject *)entry_type) < 0)
        return NULL;
    if (end > MAX_OFFSET) /* offsets this large are left to Python's integers */
        return Py_BuildValue("(NLi)", PyList_New(0), pos, SCAN_PYTHON);
    Window window = {fd, end, 0, 0, 0, NULL};
    PyObject *entries = PyList_New(0);
    if (entries == NULL)
        return NULL;
    int status = SCAN_MORE;
    while (PyList_GET_SIZE(entries) < limit) {
        PyObject *entry = NULL;
        status = read_member(&window, (PyTypeObject *)entry_type, &pos, &entry);
        if (status != SCAN_MORE)
            break;
        int failed = PyList_Append(entries, entry);
        Py_DECREF(entry);
        if (failed < 0) {
            status = -1;
            break;
        }
    }
    PyMem_Free(window.buffer);
    if (status < 0) {
        Py_DECREF(entries);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return NULL;
    }
    return Py_BuildValue("(NLi)", entries, pos, status);
}

static void
put_octal(char *field, int width, long long value)
{
    /* width - 1 digits, zero-filled, then a NUL. */
    field[width - 1] = '\0';
    for (int i = width - 2; i >= 0; i--) {
        field[i] = (char)('0' + (value & 7));
        value >>= 3;
    }
}

/* Convert an integer to long long, raising ValueError when it does not fit. */
static int
as_long_long(PyObject *number, long long *value)
{
    int overflow;
    *value = PyLong_AsLongLongAndOverflow(number, &overflow);
    if (*value == -1 && PyErr_Occurred())
        return -1;
    if (overflow) {
        PyErr_SetString(PyExc_ValueError, "invalid field: the value does not fit a ustar header");
        return -1;
    }
    return 0;
}

static PyObject *
ustar_header(PyObject *module, PyObject *args)
{
    Py_buffer name, linkname, uname, gname;
    PyObject *mode_object, *numbers[4];
    long long mode, uid, gid, size, mtime;
    char typeflag;
    if (!PyArg_ParseTuple(args, "y*OOOOOcy*y*y*", &name, &mode_object, &numbers[0],
                          &numbers[1], &numbers[2], &numbers[3], &typeflag, &linkname,
                          &uname, &gname))
        return NULL;
    PyObject *result = NULL;
    /* Only the permission bits count, as in the Python writer. */
    PyObject *mask = PyLong_FromLong(07777);
    PyObject *masked = mask ? PyNumber_And(mode_object, mask) : NULL;
    int failed = masked == NULL || as_long_long(masked, &mode) < 0 ||
                 as_long_long(numbers[0], &uid) < 0 ||
                 as_long_long(numbers[1], &gid) < 0 ||
                 as_long_long(numbers[2], &size) < 0 ||
                 as_long_long(numbers[3], &mtime) < 0;
    Py_XDECREF(mask);
    Py_XDECREF(masked);
    if (failed)
        goto done;
    if (name.len > 100 || linkname.len > 100 || uname.len > 32 || gname.len > 32 ||
        uid < 0 || uid >= MAX_ID || gid < 0 || gid >= MAX_ID || size < 0 ||
        size >= MAX_SIZE || mtime < 0 || mtime >= MAX_SIZE) {
        PyErr_SetString(PyExc_ValueError, "invalid field: the value does not fit a ustar header");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, BLOCK);
    if (result == NULL)
        goto done;
    char *header = PyBytes_AS_STRING(result);
    memset(header, 0, BLOCK);
    memcpy(header, name.buf, (size_t)name.len);
    put_octal(header + 100, 8, mode & 07777);
    put_octal(header + 108, 8, uid);
    put_octal(header + 116, 8, gid);
    put_octal(header + 124, 12, size);
    put_octal(header + 136, 12, mtime);
    memset(header + 148, ' ', 8);
    header[156] = typeflag;
    memcpy(header + 157, linkname.buf, (size_t)linkname.len);
    memcpy(header + 257, "ustar\0" "00", 8);
    memcpy(header + 265, uname.buf, (size_t)uname.len);
    memcpy(header + 297, gname.buf, (size_t)gname.len);
    put_octal(header + 329, 8, 0);
    put_octal(header + 337, 8, 0);
    unsigned int sum = byte_sum((const unsigned char *)header);
    /* Six digits, a NUL and a space, as the Python writer does. */
    put_octal(header + 148, 7, sum);
    header[155] = ' ';
done:
    PyBuffer_Release(&name);
    PyBuffer_Release(&linkname);
    PyBuffer_Release(&uname);
    PyBuffer_Release(&gname);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(fd, pos, end, limit, entry_type) -> (entries, next_pos, status)"},
    {"ustar_header", ustar_header, METH_VARARGS,
     "ustar_header(name, mode, uid, gid, size, mtime, typeflag, linkname, uname, "
     "gname) -> bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_ctar", "Compiled tar header reader and writer.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__ctar(void)
{
    for (int i = 0; i < F_COUNT; i++) {
        field_objects[i] = PyUnicode_InternFromString(field_names[i]);
        if (field_objects[i] == NULL)
            return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "MORE", SCAN_MORE) < 0 ||
        PyModule_AddIntConstant(module, "DONE", SCAN_DONE) < 0 ||
        PyModule_AddIntConstant(module, "PYTHON", SCAN_PYTHON) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
