/* kvtier.core._chainhash: the hot loop of kvtier.core.keys.KeyChain.extend for the sha256 mode.
 *
 * chain_sha256(parent, extras, tokens, chunk_tokens) -> list[bytes]
 *
 * For each full chunk of `tokens` (a list or tuple of ints; a partial last chunk has no key):
 *     key = SHA-256(parent || extras || the chunk's token ids as little-endian uint32)
 *     parent = key
 * and returns the keys in order. These are exactly the bytes the pure-Python loop in keys.py
 * hashes (it stays the reference and the fallback when this module is not built).
 *
 * Any token that is not an int in 0..2**32-1, in the partial last chunk too (as in Python), raises
 * (TypeError, OverflowError or ValueError); keys.py then re-runs its pure-Python path, which
 * raises its own clear errors.
 *
 * SHA-256 comes from OpenSSL's libcrypto (EVP interface; it uses SHA-NI where the CPU has it).
 * The GIL is held throughout: the token ids are Python objects.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define KEY_BYTES 32 /* SHA-256 digest length */

/* SHA-256 as OpenSSL implements it, looked up once when the module is imported. On OpenSSL 3 an
 * explicitly fetched digest saves a provider lookup in every EVP_DigestInit_ex (about a third of
 * the time of hashing one 128-token chunk); it is kept for the life of the process. */
static const EVP_MD *sha256_md;

/* Write the chunk's token ids as little-endian uint32 into `out`; -1 with an exception set on a
 * token that is not an int in 0..2**32-1. */
static int
pack_tokens(PyObject **items, Py_ssize_t n, unsigned char *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i];
        if (!PyLong_Check(item)) {
            PyErr_Format(PyExc_TypeError, "token ids must be integers, got %.200s",
                         Py_TYPE(item)->tp_name);
            return -1;
        }
        /* raises OverflowError for negative ids or ids past unsigned long */
        unsigned long v = PyLong_AsUnsignedLong(item);
        if (v == (unsigned long)-1 && PyErr_Occurred()) {
            return -1;
        }
        if (v > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "token id is outside 0..2**32-1");
            return -1;
        }
        unsigned char *p = out + 4 * i;
        p[0] = (unsigned char)(v);
        p[1] = (unsigned char)(v >> 8);
        p[2] = (unsigned char)(v >> 16);
        p[3] = (unsigned char)(v >> 24);
    }
    return 0;
}

/* SHA-256 over a || b || c into `digest`; -1 with an exception set if OpenSSL fails. */
static int
sha256_3(EVP_MD_CTX *ctx, const EVP_MD *md, const void *a, size_t a_len, const void *b,
         size_t b_len, const void *c, size_t c_len, unsigned char *digest)
{
    unsigned int digest_len = 0;
    if (EVP_DigestInit_ex(ctx, md, NULL) != 1 || EVP_DigestUpdate(ctx, a, a_len) != 1 ||
        EVP_DigestUpdate(ctx, b, b_len) != 1 || EVP_DigestUpdate(ctx, c, c_len) != 1 ||
        EVP_DigestFinal_ex(ctx, digest, &digest_len) != 1 || digest_len != KEY_BYTES) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 failed");
        return -1;
    }
    return 0;
}

static PyObject *
chain_sha256(PyObject *Py_UNUSED(module), PyObject *args)
{
    const char *parent_in, *extras;
    Py_ssize_t parent_len, extras_len, chunk_tokens;
    PyObject *tokens_in;
    if (!PyArg_ParseTuple(args, "y#y#On:chain_sha256", &parent_in, &parent_len, &extras,
                          &extras_len, &tokens_in, &chunk_tokens)) {
        return NULL;
    }
    if (chunk_tokens <= 0 || chunk_tokens > PY_SSIZE_T_MAX / 4) {
        PyErr_Format(PyExc_ValueError, "chunk_tokens must be positive, got %zd", chunk_tokens);
        return NULL;
    }

    /* a list or tuple is used as is (no copy); other sequences are turned into a list */
    PyObject *tokens = PySequence_Fast(tokens_in, "tokens must be a sequence of ints");
    if (tokens == NULL) {
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(tokens);
    Py_ssize_t num_tokens = PySequence_Fast_GET_SIZE(tokens);
    Py_ssize_t num_chunks = num_tokens / chunk_tokens;
    size_t chunk_bytes = 4 * (size_t)chunk_tokens;

    /* Phase 1, plain C: pack and hash every chunk into `digests`. No Python object is made here,
     * so no garbage collection can run a finalizer that changes the list under `items`. */
    PyObject *keys = NULL;
    unsigned char *digests = NULL;
    unsigned char *chunk = PyMem_Malloc(chunk_bytes);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (num_chunks <= PY_SSIZE_T_MAX / KEY_BYTES) {
        digests = PyMem_Malloc((size_t)num_chunks * KEY_BYTES + 1); /* +1: never malloc(0) */
    }
    if (chunk == NULL || ctx == NULL || digests == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    /* the first chunk's parent is the caller's; every later one is the previous key */
    const unsigned char *parent = (const unsigned char *)parent_in;
    size_t parent_size = (size_t)parent_len;
    for (Py_ssize_t i = 0; i < num_chunks; i++) {
        unsigned char *key = digests + i * KEY_BYTES;
        if (pack_tokens(items + i * chunk_tokens, chunk_tokens, chunk) < 0 ||
            sha256_3(ctx, sha256_md, parent, parent_size, extras, (size_t)extras_len, chunk,
                     chunk_bytes, key) < 0) {
            goto fail;
        }
        parent = key;
        parent_size = KEY_BYTES;
    }
    /* the partial last chunk gets no key, but its tokens are checked all the same */
    Py_ssize_t tail = num_chunks * chunk_tokens;
    if (pack_tokens(items + tail, num_tokens - tail, chunk) < 0) {
        goto fail;
    }

    /* Phase 2: the keys as a list of bytes */
    keys = PyList_New(num_chunks);
    if (keys == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < num_chunks; i++) {
        PyObject *key = PyBytes_FromStringAndSize((const char *)digests + i * KEY_BYTES, KEY_BYTES);
        if (key == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(keys, i, key); /* steals the reference */
    }

    EVP_MD_CTX_free(ctx);
    PyMem_Free(digests);
    PyMem_Free(chunk);
    Py_DECREF(tokens);
    return keys;

fail:
    EVP_MD_CTX_free(ctx); /* these four accept NULL */
    PyMem_Free(digests);
    PyMem_Free(chunk);
    Py_XDECREF(keys);
    Py_DECREF(tokens);
    return NULL;
}

static PyMethodDef chainhash_methods[] = {
    {"chain_sha256", chain_sha256, METH_VARARGS,
     "chain_sha256(parent, extras, tokens, chunk_tokens) -> list[bytes]\n\n"
     "Chained SHA-256 keys of every full chunk of tokens: key = SHA-256(parent || extras ||\n"
     "the chunk's tokens as little-endian uint32), each key the next chunk's parent."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef chainhash_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvtier.core._chainhash",
    .m_doc = "C version of KeyChain.extend's sha256 loop (optional; keys.py falls back to Python).",
    .m_size = 0,
    .m_methods = chainhash_methods,
};

PyMODINIT_FUNC
PyInit__chainhash(void)
{
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
#else
    sha256_md = EVP_sha256();
#endif
    if (sha256_md == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA-256");
        return NULL;
    }
    return PyModule_Create(&chainhash_module);
}
