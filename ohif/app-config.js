/** @type {AppTypes.Config} */
// The PACS web portal's configuration of the OHIF viewer, in place of the app-config.js of the
// pinned @ohif/app build (see ohif/pin.json); no bundle of the build is changed. The viewer reads
// everything from the portal's own origin: /dicom-web is the control plane's gate in front of the
// archive, which lets a signed-in user or a patient's study grant through and nobody else.
//
// The control plane serves this file (control/viewer.py) after one line that sets
// window.pacsPortal: the institution's name and the way back to the portal for this browser.
// Everything is inside a function, so that no name of it meets a name of the viewer's scripts.
(function () {
  const portal = window.pacsPortal || {
    institution: '',
    department: '',
    back: { href: '/', label: 'Back to the portal', results: false },
  };

  // On a phone-sized screen the series list and the measurements panel start closed, so that the
  // image gets the screen; their toggles still open them.
  const narrowScreen = window.matchMedia('(max-width: 768px)').matches;

  // A signed-in user goes back to the results page the viewer was opened from: the portal's pages
  // send their address to the portal itself (Referrer-Policy same-origin), to no one else.
  function wayBack() {
    if (portal.back.results && document.referrer) {
      try {
        const from = new URL(document.referrer);
        if (from.origin === window.location.origin && from.pathname.startsWith('/query/')) {
          return from.pathname + from.search;
        }
      } catch (error) {
        // not an address: keep the portal's own choice
      }
    }
    return portal.back.href;
  }

  function portalLink(React) {
    const line = { display: 'block', whiteSpace: 'nowrap', overflow: 'hidden', textOverflow: 'ellipsis' };
    const label = `${portal.back.label}: ${portal.institution}`;
    // On a phone the viewer's toolbar takes the whole header: the link is its arrow alone there.
    const words = narrowScreen
      ? []
      : [
          React.createElement(
            'span',
            { key: 'words', style: { display: 'flex', flexDirection: 'column', minWidth: 0, lineHeight: 1.2 } },
            React.createElement('strong', { style: { ...line, fontSize: '14px' } }, portal.institution),
            React.createElement('span', { style: { ...line, fontSize: '11px', opacity: 0.8 } }, portal.back.label)
          ),
        ];
    return React.createElement(
      'a',
      {
        href: wayBack(),
        className: 'pacs-portal-link',
        title: label,
        'aria-label': label,
        style: {
          display: 'flex',
          alignItems: 'center',
          gap: '8px',
          maxWidth: '235px',
          color: '#fff',
          textDecoration: 'none',
        },
      },
      React.createElement('span', { key: 'arrow', 'aria-hidden': 'true', style: { fontSize: '22px', lineHeight: 1 } }, '‹'),
      ...words
    );
  }

  window.config = {
    name: 'pacs-portal',
    routerBasename: null,
    extensions: [],
    modes: [],
    // The header's logo is the institution, linking back to the portal.
    whiteLabeling: {
      createLogoComponentFn: portalLink,
    },
    customizationService: [
      {
        // No onboarding tour: the portal's users are not the viewer project's visitors.
        'ohif.tours': { $set: [] },
      },
    ],
    modesConfiguration: {
      '@ohif/mode-longitudinal': {
        routes: { 0: { layoutInstance: { props: { leftPanelClosed: { $set: narrowScreen } } } } },
      },
    },
    showStudyList: false,
    investigationalUseDialog: { option: 'never' },
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    maxNumRequests: {
      interaction: 100,
      thumbnail: 5,
      prefetch: 25,
    },
    showErrorDetails: 'production',
    defaultDataSourceName: 'pacs',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'pacs',
        configuration: {
          friendlyName: 'PACS web portal',
          name: 'pacs',
          qidoRoot: '/dicom-web',
          wadoRoot: '/dicom-web',
          wadoUriRoot: '/wado',
          qidoSupportsIncludeField: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          // Orthanc's DICOMweb plugin answers 400 to /rendered on a PDF, so only video is singlepart.
          singlepart: 'video',
          bulkDataURI: {
            enabled: true,
            relativeResolution: 'studies',
          },
          omitQuotationForMultipartRequest: true,
        },
      },
    ],
  };
})();
